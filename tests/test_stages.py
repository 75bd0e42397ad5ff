"""Stage cache: reruns skip finished stages; changed options or touched outputs redo the stage."""
from exporter.stages import StageCache, stage_key


def _producer(out, calls, name="a.txt", text="x"):
    def produce():
        calls.append(name)
        (out / name).write_text(text)
        return [name]
    return produce


def test_rerun_skips_and_changed_key_or_output_redoes(tmp_path):
    calls = []
    cache = StageCache(tmp_path)
    key = stage_key("quantize", {"bits": 4})
    assert not cache.run("quantize", key, _producer(tmp_path, calls)).cached
    assert cache.run("quantize", key, _producer(tmp_path, calls)).cached
    assert calls == ["a.txt"]
    # a changed option is a new key
    assert not cache.run("quantize", stage_key("quantize", {"bits": 8}), _producer(tmp_path, calls)).cached
    # an output changed behind the cache's back is not trusted
    (tmp_path / "a.txt").write_text("tampered, longer")
    assert not cache.run("quantize", stage_key("quantize", {"bits": 8}), _producer(tmp_path, calls)).cached
    assert len(calls) == 3


def test_force_redoes_and_a_failed_run_keeps_or_invalidates_correctly(tmp_path):
    calls = []
    key = stage_key("export")
    StageCache(tmp_path).run("export", key, _producer(tmp_path, calls))
    assert not StageCache(tmp_path, force=True).run("export", key, _producer(tmp_path, calls)).cached

    def fail_early():
        raise ValueError("bad input")

    def crash_midway():
        (tmp_path / "a.txt").write_text("half of a new, different output")
        raise KeyboardInterrupt

    try:
        StageCache(tmp_path).run("export", stage_key("export", 2), fail_early)
    except ValueError:
        pass
    # nothing was touched: the existing export is still valid
    assert StageCache(tmp_path).lookup("export", key) is not None
    try:
        StageCache(tmp_path).run("export", stage_key("export", 2), crash_midway)
    except KeyboardInterrupt:
        pass
    # an output was rewritten: the old record no longer matches it and is not trusted
    assert StageCache(tmp_path).lookup("export", key) is None
