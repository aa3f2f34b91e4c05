"""Promises of the repository itself: CI runs the README's test command; notebooks are valid and compile."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [
        line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_ci_runs_the_readme_test_command():
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set", "cd"))
    ]
    assert ci[0] in readme_commands()
    assert "pytest" in ci[0]


def test_readme_main_command_runs_the_quickstart():
    assert any(
        "lit-mllm fit --config configs/quickstart.yaml" in c and "pip install" in c for c in readme_commands()
    )


def test_notebooks_are_valid_and_compile():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        cells = json.loads(nb.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                compile("".join(cell["source"]), f"{nb.name}", "exec")


def test_install_commands_use_the_constraints_that_pin_every_dependency():
    """The README's and CI's installs take constraints.txt, which pins (==) every dependency of pyproject.toml."""
    import tomllib

    installs = [c for c in readme_commands() if "pip install" in c]
    installs += [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in c for c in installs)
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.sub(r"[-_.]+", "-", re.split(r"[<>=\[ ;]", w)[0]).lower() for w in wanted}
    assert not names - set(pins), f"not pinned in constraints.txt: {sorted(names - set(pins))}"
    assert all(re.fullmatch(r"\d[\w.+]*", v) for v in pins.values())
