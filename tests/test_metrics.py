"""metrics.jsonl as a resumed run writes it."""

import io
import json

from distpg.metrics import MetricsLogger


def test_a_resumed_runs_time_goes_on_from_its_checkpoint(tmp_path):
    # time_s restarted at 0 on --resume, so `distpg plot` drew a resumed run's curve back to the left
    # (metrics.jsonl as --resume leaves it: cut at the checkpoint's step 3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time_s": 10.0 * s}) + "\n"
                                                    for s in (1, 2, 3)))
    logger = MetricsLogger(tmp_path, total_steps=10, tensorboard=False, print_every=100, start_step=3,
                           stream=io.StringIO())
    for step in (4, 5):
        logger.log(step, {"x": 0.0})
    logger.close()
    times = [json.loads(line)["time_s"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert times[:3] == [10.0, 20.0, 30.0] and 30.0 <= times[3] <= times[4]
    # a new run starts at 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    logger = MetricsLogger(fresh, total_steps=10, tensorboard=False, print_every=100, stream=io.StringIO())
    logger.log(1, {"x": 0.0})
    logger.close()
    assert json.loads((fresh / "metrics.jsonl").read_text())["time_s"] < 10.0
