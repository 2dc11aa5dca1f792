"""An unmarked test: the controller runs it itself (unless a default queue is set)."""


def test_runs_on_the_controller(dispatch_context):
    assert dispatch_context.dispatched is False
    assert dispatch_context.worker == "local"
