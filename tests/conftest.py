import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_proxy_dataset(tmp_path_factory):
    """Two scripted-expert episodes on the real-proxy twin at 32x32, as a LeRobot dataset."""
    from common.config import load_config
    from common.twin import write_demos

    root = tmp_path_factory.mktemp("real_proxy_demos") / "ds"
    cfg = load_config("config", ["env=real_proxy", "env.image_size=32"])
    write_demos(cfg.env, root, "local/real_proxy", 2, real_proxy=True, seed=0)
    return root
