import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every checkpoint here is a local directory


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than two minutes (deselect with -m 'not slow')")
