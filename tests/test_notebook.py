"""Execute examples/walkthrough.ipynb end to end, so the walkthrough cannot rot."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"
KERNEL = "moeae-test-python"


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel running *this* interpreter (the venv's), whatever kernelspecs are installed.

    The kernelspec lives in a private folder that is the only one searched, so a user's or the
    system's ``python3`` kernelspec cannot substitute another Python.
    """
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moeae test kernel", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_walkthrough_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the file is stored clean
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, timeout=300, km=_kernel_manager(tmp_path),
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError if any cell fails

    assert _stdout(nb.cells[0]).strip() == sys.executable
    out = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert list(workdir.iterdir()) == []  # the notebook leaves no files behind

    def number(pattern: str) -> float:
        m = re.search(pattern + r"\s*=\s*([-+0-9.eE]+)", out)
        assert m, f"{pattern!r} not printed:\n{out}"
        return float(m.group(1))

    circle = number(r"circle, best recipe, 2 experts: hard FVU")
    vanilla = number(r"circle, vanilla autoencoder \(1 expert\): hard FVU")
    sphere = number(r"sphere, 4 experts, latent_dim=2: hard FVU")
    digits = number(r"digits, 8 experts, latent_dim=2: hard FVU")
    pca2 = number(r"digits, PCA with 2 components: FVU")
    assert circle < 1e-3
    assert vanilla > 10 * circle  # one chart cannot cover the circle
    assert sphere < 1e-2
    assert digits < pca2
    assert "largest code difference after the round trip" in out
