import pytest

from volta3d.runtime import MetricsCSV, atomic_write


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]  # no temp file left behind


def test_metrics_csv_resume_drops_rows_after_the_checkpoint(tmp_path):
    m = MetricsCSV(tmp_path / "metrics.csv")
    for step in (1, 2, 3):
        m.write({"step": step, "loss": 1.0 / step})
    resumed = MetricsCSV(tmp_path / "metrics.csv", keep_until_step=2)
    resumed.write({"step": 3, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in resumed.read()] == [("1", "1.0"), ("2", "0.5"), ("3", "0.5")]
    with pytest.raises(KeyError, match="not in metrics.csv"):
        resumed.write({"step": 4, "lr": 0.1})


def test_every_command_has_help(capsys):
    """`volta3d --help` and each subcommand's --help render (argparse %-formats help strings)."""
    from volta3d.cli import COMMANDS, main

    for argv in (["--help"], *[[c, "--help"] for c in COMMANDS], ["finetune", "classify", "--help"],
                 ["finetune", "segment", "--help"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0, argv
        assert "usage: volta3d" in capsys.readouterr().out


def test_help_imports_neither_torch_nor_monai():
    """`volta3d --help` (building every command's parser) stays light: heavy imports happen when a command runs."""
    import subprocess
    import sys

    code = ("import sys, volta3d.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'sklearn') if m in sys.modules))")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
