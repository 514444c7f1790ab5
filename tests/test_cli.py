"""The reference generator's command line: output and errors."""

from __future__ import annotations

import json

from export.generate import main


def test_json_output(tiny_dir, capsys):
    args = ["--model", str(tiny_dir), "--layout", "single", "--k", "15", "--p", "50",
            "--steps", "4", "--gen-length", "8", "--block-length", "8", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 729 and out["pruned_visual_tokens"] == 364
    assert out["sequence_reduced"] == out["sequence_full"] - 364
    assert len(out["kept_visual"]) == 365 and out["kept_visual"] == sorted(out["kept_visual"])
    assert out["steps_run"] <= 4 and len(out["answer_ids"]) <= 8
    assert out["cache"] == "none" and len(out["rows_computed"]) == out["steps_run"]


def test_errors_exit_2_with_a_message(tiny_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_dir), "--k", "32"]) == 2
    assert "K: got 32" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--p", "100"]) == 2
    assert "P: got 100" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--image", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--steps", "40"]) == 2
    assert "steps: got 40; expected <= --gen-length=32" in capsys.readouterr().err  # the flag the user typed
    assert main(["--model", str(tiny_dir), "--cache", "dual", "--cache-refresh", "-1"]) == 2
    assert "--cache-refresh: got -1; expected an integer >= 0" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--threshold", "1.5"]) == 2
    assert "threshold: got 1.5; expected a probability in [0, 1)" in capsys.readouterr().err


def test_console_commands_are_installed():
    """pip install gives lladav-build, lladav-run, lladav-generate and lladav-replay beside the python -m /
    script forms."""
    import shutil
    import subprocess
    import sys
    from importlib.metadata import entry_points
    from pathlib import Path

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("lladav-")}
    assert scripts == {"lladav-build": "export.build_engines:main", "lladav-run": "runtime.__main__:main",
                       "lladav-generate": "export.generate:main", "lladav-replay": "runtime.replay:main"}
    # next to the interpreter running the suite (a venv's bin/, activated or not), then PATH
    beside = str(Path(sys.executable).parent)
    for name in scripts:
        path = shutil.which(name, path=beside) or shutil.which(name)
        assert path, f"{name} is neither next to {sys.executable} nor on PATH (reinstall: pip install -e .)"
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
        if name == "lladav-run":  # usage and errors name the command typed, not "python -m runtime"
            assert done.stdout.startswith("usage: lladav-run "), done.stdout[:60]


def test_help_texts_state_defaults_units_and_rules(capsys):
    """Every option of the three entry points has help; defaults are shown; --opt-image reads WIDTHxHEIGHT,
    --k its range, --steps the block rule; every precision is offered."""
    import argparse

    from export import build_engines, generate
    from runtime import __main__ as run_cli

    for module in (build_engines, generate, run_cli):
        ap = module.build_parser()
        for action in ap._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (module.__name__, action.option_strings)
        assert "(default: None)" not in ap.format_help()
    build_help = " ".join(build_engines.build_parser().format_help().split())
    assert "--opt-image WIDTHxHEIGHT" in build_help and "(default: 1920x1080)" in build_help
    assert "1..L-1" in build_help and "(default: 15)" in build_help and "(default: 50.0)" in build_help
    assert "{fp16,fp32,int8,int4}" in build_help
    run_help = " ".join(run_cli.build_parser().format_help().split())
    assert "a multiple of the number of blocks (gen-length / block-length), at most --gen-length" in run_help
    assert "must divide --gen-length" in run_help and "(default: the bundle's P)" in run_help


def test_the_car_installs_without_torch_and_the_readme_commands_parse():
    import shlex
    import tomllib
    from pathlib import Path

    from runtime import __main__ as run_cli

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not any(name in base for name in ("torch", "transformers", "safetensors"))  # the car's install
    assert {"torch", "transformers", "safetensors"} <= {d.split(">")[0] for d in project["optional-dependencies"]["export"]}
    readme = (root / "README.md").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[export]" && python export/build_engines.py --k 15 --p 50' in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU-only workstation's torch
    runs = [line for line in readme.splitlines() if line.startswith("python -m runtime ")]
    assert runs and any("--image" not in line for line in runs)  # the quick start runs as written: demo scene
    for line in runs:
        run_cli.build_parser().parse_args(shlex.split(line)[3:])


def test_generation_defaults_follow_the_length_typed_and_help_names_the_real_demo_scene(tiny_dir, capsys):
    """--gen-length 8 alone failed on the default block length 32 the user never typed; steps and block
    now default to the response length. The run's help named a 640x480 demo scene; it is 640x360."""
    from runtime import __main__ as run_cli
    from runtime.demo import demo_image

    args = ["--model", str(tiny_dir), "--layout", "single", "--gen-length", "8", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_run"] <= 8 and len(out["answer_ids"]) <= 8
    w, h = demo_image().size
    assert f"built-in {w}x{h} demo road scene" in " ".join(run_cli.build_parser().format_help().split())
