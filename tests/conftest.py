from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole session."""
    with RedisServer(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a freshly emptied database."""
    redis_server.client.flushdb()
    yield redis_server.client


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny maze model with a few supervised steps: enough for the plumbing, not for skill."""
    from services.trainer.tiny_model import build_tiny

    return build_tiny(Path(tmp_path_factory.mktemp("model")) / "tiny", steps=3, batch=8)


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 5x5 maze model with 100 supervised steps (about 10 s): it solves some mazes and fails
    most, so a count of correct answers has both kinds to get wrong."""
    from services.trainer.tiny_model import build_tiny

    return build_tiny(Path(tmp_path_factory.mktemp("model")) / "warm", sizes=(5,), steps=100, batch=16, horizon=300)
