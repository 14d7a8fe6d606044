import pytest

from sidpt.env.search.env import SearchEnv, SearchEnvConfig, load_questions
from sidpt.env.search.task import make_search_task


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """A small generated task (60 entities) on disk: its paths by name."""
    return make_search_task(tmp_path_factory.mktemp("task"), n_entities=60, seed=7)


@pytest.fixture(scope="session")
def questions(task):
    return load_questions(task["train"])


@pytest.fixture(scope="session")
def env(task):
    """Stateless between episodes (state lives in EnvState), so one env serves every test."""
    return SearchEnv(SearchEnvConfig(corpus=str(task["corpus"]), max_turns=3))
