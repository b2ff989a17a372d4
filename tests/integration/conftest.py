"""One real local Ray cluster for the whole integration session (ray.init takes seconds).

Token auth is off and Ray's files go to a private temp dir, so the tests never touch another
Ray on this machine. Never `ray stop` here: it would kill every Ray process on the machine.
"""

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    temp_dir = tempfile.mkdtemp(prefix="moeray-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
