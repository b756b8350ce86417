import pytest


@pytest.fixture(autouse=True)
def _recipe_errors_raise(monkeypatch):
    """Recipes run in-process by the tests raise their errors (as MEDCAP_DEBUG=1 makes them do) so that tests can
    check them; tests of the one-line behaviour delete the variable."""
    monkeypatch.setenv("MEDCAP_DEBUG", "1")
