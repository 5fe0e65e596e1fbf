"""benchmarks/bench_triton_start.py: the embedded server's start time and memory, measured."""

import json

import pytest

from benchmarks.bench_triton_start import MODEL_SETS, main
from benchmarks.stack import triton_on_free_ports
from build_engines.serve import missing_model_files


def test_report_gives_seconds_to_ready_and_memory_of_server_and_stubs(tmp_path, capsys):
    missing = missing_model_files(triton_on_free_ports(MODEL_SETS["console_default"]).settings)
    if missing:
        pytest.skip(f"not built: {missing[0]}; run 'python -m build_engines export'")
    argv = ["--set", "console_default", "--repeats", "2", "--results-dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "triton_start.json").read_text())["sets"]["console_default"]
    assert result["models"][0] == MODEL_SETS["console_default"][0]
    assert len(result["starts"]) == 2
    for start in result["starts"]:
        # The server and one backend stub per model, each holding memory.
        assert start["processes"] == 1 + len(result["models"])
        assert start["ready_s"] > 0
        assert 0 < start["pss_mib"] <= start["rss_mib"]
    assert "| console_default |" in (tmp_path / "triton_start.md").read_text()
    assert "console_default" in capsys.readouterr().out


def test_zero_repeats_is_refused_before_any_server_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--repeats", "0", "--results-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
