from distpg.cli import run

run()
