"""The shortfin environment's side of tests/test_shortfin.py (setup_env.sh, drive.py) and its toy module."""
