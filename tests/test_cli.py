import subprocess
import sys

from pipeline.cli import main


def test_help_lists_every_command_without_importing_torch():
    code = "import sys; from pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for command in ("extract", "features", "fit", "validate", "test", "predict", "report", "ui"):
        assert command in done.stdout
    assert done.stdout.strip().endswith("False")


def test_extract_error_exits_nonzero_naming_the_manifest(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["extract", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")])
    assert "nope.csv: manifest not found" in str(err.value)


def test_report_table(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"test/acc": 0.5, "test/loss": 1.25}')
    (tmp_path / "b.json").write_text('{"test/acc": 0.75}')
    main(["report", "--metrics", str(tmp_path), "--out", str(tmp_path / "summary.md")])
    out = capsys.readouterr().out
    assert "| a | 0.5000 | 1.2500 |" in out and "| b | 0.7500 |  |" in out
    assert (tmp_path / "summary.md").read_text().strip() == out.strip()
