"""The README's API example runs as written (so the README stays true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)  # the example writes a checkpoint
    monkeypatch.setenv("GPUBACKPROP_BACKEND", "numpy")
    namespace: dict = {}
    exec(compile(blocks[0].replace("verbose=1", "verbose=0"), "README.md", "exec"), namespace)
    assert namespace["history"]["val_accuracy"][-1] > 0.9
    assert (tmp_path / "digits.safetensors").is_file()
    assert namespace["model2"].config() == namespace["model"].config()


def test_readme_quick_start_commands_match_ci():
    text = README.read_text(encoding="utf-8")
    assert "pip install . && gpubackprop train" in text
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest" in text and "python -m pytest" in ci
    assert "torch==2.13.0" in text and "torch==2.13.0" in ci


def test_derivation_page_names_only_functions_and_kernels_that_exist():
    """docs/derivation.md puts each equation beside its code: every name it cites must exist."""
    from gpubackprop.backends.elementwise import elementwise_specs
    from gpubackprop.backends.numpy_backend import NumpyBackend
    from gpubackprop.kernels import entry_points

    root = README.parent
    page = (root / "docs" / "derivation.md").read_text(encoding="utf-8")
    for file, kernel in re.findall(r"`(\w+\.cuh?): (\w+)", page):
        source = (root / "kernels" / file).read_text(encoding="utf-8")
        assert re.search(rf"\b{kernel}\s*\(", source), f"{kernel} not in kernels/{file}"
        if file.endswith(".cu"):
            assert kernel in entry_points(source), f"{kernel} is not an entry point of {file}"
    specs = {spec.name for spec in elementwise_specs()}
    for name in re.findall(r"elementwise `(\w+)`", page):
        assert name in specs, f"elementwise kernel {name} is not an elementwise kernel"
    for method in re.findall(r"`NumpyBackend\.(\w+)`|\| `(\w+)` \|", page):
        name = next(m for m in method if m)
        assert hasattr(NumpyBackend, name), f"NumpyBackend has no {name}"


def test_readme_is_a_short_front_page_whose_links_resolve():
    """A newcomer's page (detail lives in docs/): at most 160 lines, and every relative link
    and picture it shows exists in the checkout."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert "LICENSE" in targets and "docs/images/digits_training.png" in targets
    for target in targets:
        if "://" not in target:
            assert (README.parent / target).exists(), f"README links to missing {target}"
