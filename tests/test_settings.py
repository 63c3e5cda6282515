import pytest

from pathgen.settings import Settings, SettingsError, load_settings, parse_assignments
from tasks.slides.hashing import slide_extraction_hash
from tasks.slides.sources import SlideRef


def test_defaults_match_the_paper_and_the_issue():
    s = Settings()
    assert s.store == "file://./store"
    assert s.patch.patch_px == 672
    assert s.tissue.threshold == 0.5
    assert s.selection.max_per_slide == 256
    assert s.slides.default_mpp is None


def test_yaml_then_environment_then_command_line(tmp_path):
    config = tmp_path / "pathgen.yaml"
    config.write_text("patch:\n  target_mpp: 1.0\n  patch_px: 512\nselection:\n  method: all\n")
    env = {"PATHGEN_PATCH__PATCH_PX": "448", "PATHGEN_STORE": "s3://bucket/run", "UNRELATED": "x"}
    s = load_settings(config, ["patch.patch_px=256", "slides.mpp_overrides={a: 0.25}"], environ=env)
    assert s.patch.target_mpp == 1.0  # file
    assert s.store == "s3://bucket/run"  # environment
    assert s.patch.patch_px == 256  # command line beats environment
    assert s.selection.method == "all"
    assert s.slides.mpp_overrides == {"a": 0.25}


def test_wrong_value_names_the_field_and_the_allowed_values():
    with pytest.raises(SettingsError) as err:
        load_settings(overrides=["selection.method=kmeans"], environ={})
    assert "selection.method" in str(err.value)
    assert "'all'" in str(err.value) and "'random'" in str(err.value)


def test_out_of_range_value_is_refused():
    with pytest.raises(SettingsError, match=r"tissue.threshold.*less than or equal to 1"):
        load_settings(overrides=["tissue.threshold=1.5"], environ={})


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(SettingsError, match=r"unknown setting 'target_mpp'.*'patch.target_mpp'"):
        load_settings(overrides=["target_mpp=0.5"], environ={})


def test_bad_assignment_syntax_and_missing_config(tmp_path):
    with pytest.raises(SettingsError, match="key=value"):
        parse_assignments(["patch.patch_px"])
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_extraction_hash_follows_what_changes_patches():
    ref = SlideRef("slide-a", "/data/slide-a.svs", "file")
    a = load_settings(environ={})
    elsewhere = load_settings(overrides=["store=s3://elsewhere"], environ={})
    assert slide_extraction_hash(ref, a) == slide_extraction_hash(ref, elsewhere)
    smaller = load_settings(overrides=["patch.patch_px=224"], environ={})
    assert slide_extraction_hash(ref, a) != slide_extraction_hash(ref, smaller)


def test_one_retry_section_and_the_old_keys_point_to_it():
    s = Settings()
    assert (s.retries.io_retries, s.retries.backoff_seconds) == (3, 1.0)
    assert (s.retries.task_retries, s.retries.task_retry_delay_seconds) == (2, 30.0)
    assert s.agents.slides_per_task == 4
    tuned = load_settings(overrides=["retries.task_retries=0", "retries.io_retries=1"], environ={})
    assert (tuned.retries.task_retries, tuned.retries.io_retries) == (0, 1)
    with pytest.raises(SettingsError, match=r"unknown setting 'extract.io_retries'.*'retries.io_retries'"):
        load_settings(overrides=["extract.io_retries=1"], environ={})
    with pytest.raises(SettingsError, match=r"unknown setting 'extract.io_backoff_seconds'.*'retries.backoff_seconds'"):
        load_settings(overrides=["extract.io_backoff_seconds=1"], environ={})
    for gone in ("agents.openai_retries=2", "agents.shard_size=5"):
        with pytest.raises(SettingsError, match="unknown setting"):
            load_settings(overrides=[gone], environ={})
