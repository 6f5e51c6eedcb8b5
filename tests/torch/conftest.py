"""Fixtures shared by the torch tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled MiniLM's tokenizer (loaded once per test session)."""
    transformers = pytest.importorskip("transformers")
    from gd_cli.models import minilm_path

    return transformers.AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture
def gloo_two_process_run(once, tmp_path_factory, monkeypatch, warm_python) -> Path:
    """The folder of ONE two-process gloo run (``_torch_norms_dist_worker.run``: the norms path,
    the diagonal path with apply and a DDP step, the edge cases of test_integrity.py), shared by
    the tests that check it: ``rank0-norms.npz`` and ``rank0.npz`` of rank 0,
    ``unequal-{diagonal,norms}/rank{0,1}.json``, ``masked/masked.npz``. A run that hangs is
    killed and fails every test that asks for it. The two children are forked warm
    (tests/_warm.py: multiprocessing's spawn through the warm interpreter)."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    # the spawned children import the worker by name with the parent's sys.path
    monkeypatch.syspath_prepend(str(HERE))

    def produce() -> str:
        import multiprocessing.spawn

        import _torch_norms_dist_worker as worker

        out = tmp_path_factory.mktemp("gloo")
        cold = multiprocessing.spawn.get_executable()
        multiprocessing.set_executable(warm_python)
        try:
            ctx = torch.multiprocessing.spawn(
                worker.run, args=(2, str(out / "init"), str(out)), nprocs=2, join=False
            )
        finally:
            multiprocessing.set_executable(cold)
        end = time.monotonic() + 180
        while not ctx.join(timeout=1):
            if time.monotonic() > end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail("the two-process gloo run hung (killed after 180 s)")
        return str(out)

    return Path(once("torch-gloo-two-process", produce))
