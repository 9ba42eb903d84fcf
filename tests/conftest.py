import os

import pytest
import torch

# Keep the 2-core CI machine responsive when several processes train at once.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir():
    from labkit.tiny import ensure_tiny

    return ensure_tiny()


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)
    # In-process trainers may leave a torch process group; its gloo threads must not outlive the session.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # Widget pollers, tokenizer and gloo worker threads still inside native code when the interpreter
    # finalizes can abort it ("terminate called ... exception not rethrown") or hang it after every test
    # has passed; the session's result is final by now, so leave with it directly.
    import sys
    import threading

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        print(f"\n[conftest] threads still alive at exit: {alive}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
