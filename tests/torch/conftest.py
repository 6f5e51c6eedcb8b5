"""Fixtures shared by the torch tests."""

from __future__ import annotations

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
def gloo_two_process_run(once, tmp_path_factory, monkeypatch) -> Path:
    """The folder of ONE two-process gloo run (``_torch_norms_dist_worker.run``: the norms path,
    then the diagonal path with apply and a DDP step), shared by the two tests that check it:
    ``rank0-norms.npz`` and ``rank0.npz`` of rank 0."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    # the spawned children import the worker by name with the parent's sys.path
    monkeypatch.syspath_prepend(str(HERE))

    def produce() -> str:
        import _torch_norms_dist_worker as worker

        out = tmp_path_factory.mktemp("gloo")
        torch.multiprocessing.spawn(
            worker.run, args=(2, str(out / "init"), str(out)), nprocs=2, join=True
        )
        return str(out)

    return Path(once("torch-gloo-two-process", produce))
