"""What the driver shows: progress for long loads, the report table, `tp-reload demo --json`,
and the error a rank gives when a checkpoint path is not readable on its node."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

import orchestrator.progress as progress_module
from actors.transports import BucketReader
from actors.transports.files import FileBucket, FileEntry
from orchestrator.progress import Progress
from orchestrator.report import ReloadReport


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_for_short_loads():
    stream = io.StringIO()
    bar = Progress("load v1", [1_000_000] * 3, stream=stream)
    for _ in range(3):
        bar.advance(1_000_000)
    bar.close()
    assert stream.getvalue() == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_shows_buckets_bytes_and_rate_for_long_loads(monkeypatch, terminal):
    monkeypatch.setattr(progress_module, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 3600.0)
    stream = FakeTerminal() if terminal else io.StringIO()
    bar = Progress("load v7", [1_000_000] * 4, stream=stream)
    for _ in range(4):
        bar.advance(1_000_000)
    bar.close()
    out = stream.getvalue()
    assert "load v7: bucket 4/4, 4.0/4.0 MB" in out and "MB/s" in out
    if terminal:
        assert out.count("\r") == 5 and out.endswith("\n"), "redrawn in place, then a newline"
    else:
        # Logs get the first line, then (rate-limited) only the final state.
        assert [line.split(",")[0] for line in out.splitlines()] == ["load v7: bucket 1/4",
                                                                     "load v7: bucket 4/4"]


def test_progress_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(progress_module, "PROGRESS_AFTER_S", 0.0)
    stream = io.StringIO()
    bar = Progress("load v1", [10], enabled=False, stream=stream)
    bar.advance(10)
    bar.close()
    assert stream.getvalue() == ""


def test_report_table_names_every_stage_rank_and_the_expert_share():
    report = ReloadReport(
        version=3, seconds=1.5, stage_seconds={"plan": 0.1, "transfer": 0.5, "load": 0.1,
                                              "process": 0.7, "finalize": 0.1},
        bytes_read={(0, 0): 2_000_000, (0, 1): 2_000_000}, peak_buffered_bytes=500_000,
        predicted_peak_buffered_bytes=500_000, layers_reloaded=["a", "b"], layers_kept=["c"],
        warnings=["engine 0 rank 1: two layers buffered"], order="plan", source="ckpt/step_3",
        source_bytes=4_000_000, buckets=5, bytes_by_kind={"experts": 3_000_000,
                                                          "dense": 1_000_000},
        seconds_by_kind={"experts": 2.0, "dense": 2.0})
    table = report.table()
    for text in ("version        3", "ckpt/step_3 (4.00 MB, 5 buckets, plan order)",
                 "process 0.700", "e0/r1 2.00 MB", "0.500 MB per rank (predicted 0.500 MB)",
                 "2 reloaded, 1 kept", "75% of bytes, 50% of rank time",
                 "two layers buffered"):
        assert text in table, table
    assert report.share("experts") == (0.75, 0.5)
    staged = replace(report, staged=True, pause_seconds=0.05, staging_bytes=2_000_000).table()
    assert "paused         0.050 s serving (staged, 2.00 MB staging per rank)" in staged, staged


def test_rank_names_an_unreadable_checkpoint_path(tmp_path):
    missing = tmp_path / "elsewhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="same path on every node"):
        BucketReader().items(FileBucket((
            FileEntry("model.embed_tokens.weight", "float32", (8, 4), str(missing)),)))


def assert_demo_passed(result: dict, engine: str) -> None:
    assert result["ok"] and result["reload"]["kernel_tensors_unchanged"]
    assert result["engine"] == engine and result["reload"]["rollout_version"] == 1
    for stage in (result, result["reload"]):
        assert stage["greedy_tokens_match_transformers"]
        assert stage["logprob_max_abs_error_vs_transformers"] <= 1e-4


@pytest.mark.parametrize(("blocked", "engine", "names"), [
    (("transformers",), "native", ["tp-reload[demo]"]),
    (("transformers", "vllm"), "vllm", ["tp-reload[demo]", "tp-reload[vllm]", "--engine native"]),
])
def test_demo_names_the_extra_a_plain_install_lacks(blocked, engine, names):
    """After `pip install tp-reload` (no extras) the demo says what to install, before it
    starts anything, instead of failing on an import."""
    import subprocess
    import sys

    # A None entry in sys.modules makes any import of that package fail, as if absent.
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r}))\n"
            f"from orchestrator.cli import main; sys.exit(main(['demo', '--engine', {engine!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "tp-reload demo needs" in result.stderr
    assert all(name in result.stderr for name in names), result.stderr
    assert "Traceback" not in result.stderr
