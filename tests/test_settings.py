import re
from pathlib import Path

import pytest

from pathgen.settings import NON_SETTING_ENV_VARS, Settings, SettingsError, load_settings, parse_assignments
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


def test_map_entries_and_lists_as_the_errors_recommend():
    s = load_settings(
        overrides=[
            "slides.mpp_overrides.nompp=0.5",
            "slides.mpp_overrides.CMU-1.svs=0.25",  # a file name: everything after the map key is the entry
            "slides.projects.TCGA-XX-0001=TCGA-BRCA",
            "slides.roots=/a,/b",
            "sources=one.svs",
            "eval.shots=1,4",
        ],
        environ={},
    )
    assert s.slides.mpp_overrides == {"nompp": 0.5, "CMU-1.svs": 0.25}
    assert s.slides.projects == {"TCGA-XX-0001": "TCGA-BRCA"}
    assert (s.slides.roots, s.sources, s.eval.shots) == (["/a", "/b"], ["one.svs"], [1, 4])
    # A YAML list still works, and is how an item holding a comma is written; a whole map still replaces the map.
    listed = load_settings(overrides=["slides.roots=[/a, '/b,c']", "slides.mpp_overrides={x: 1}"], environ={})
    assert (listed.slides.roots, listed.slides.mpp_overrides) == (["/a", "/b,c"], {"x": 1.0})
    # A path that looks like a number stays a string; an empty value is the empty list.
    assert load_settings(overrides=["slides.roots=2024"], environ={}).slides.roots == ["2024"]
    assert load_settings(overrides=["slides.roots="], environ={}).slides.roots == []
    # The same through a mapping, the way flows receive their overrides.
    assert load_settings(overrides={"slides.roots": "/a,/b"}, environ={}).slides.roots == ["/a", "/b"]
    # Keys of an optional section still work.
    assert load_settings(overrides=["clip.stage2.folder=/pairs"], environ={}).clip.stage2.folder == "/pairs"


def test_map_entry_values_are_validated_and_misspelt_maps_suggested():
    with pytest.raises(SettingsError, match=r"slides.mpp_overrides.nompp.*valid number"):
        load_settings(overrides=["slides.mpp_overrides.nompp=thin"], environ={})
    with pytest.raises(SettingsError, match=r"unknown setting 'slides.mpp_override.x'.*'slides.mpp_overrides'"):
        load_settings(overrides=["slides.mpp_override.x=0.5"], environ={})


def test_environment_sets_map_entries_lower_cased_and_lists():
    env = {
        "PATHGEN_SLIDES__MPP_OVERRIDES__NOMPP": "0.5",
        "PATHGEN_SLIDES__PROJECTS__S1": "TCGA-LUAD",
        "PATHGEN_SLIDES__ROOTS": "/a,/b",
    }
    s = load_settings(environ=env)
    assert s.slides.mpp_overrides == {"nompp": 0.5}
    assert s.slides.projects == {"s1": "TCGA-LUAD"}
    assert s.slides.roots == ["/a", "/b"]
    # The command line adds an entry beside the environment's.
    both = load_settings(overrides=["slides.mpp_overrides.other=1"], environ=env)
    assert both.slides.mpp_overrides == {"nompp": 0.5, "other": 1.0}


def test_an_unknown_pathgen_variable_is_an_error_with_the_likely_name():
    with pytest.raises(SettingsError, match=r"PATHGEN_PATCH__TARGET_MP\b.*did you mean PATHGEN_PATCH__TARGET_MPP\b"):
        load_settings(environ={"PATHGEN_PATCH__TARGET_MP": "0.25"})
    with pytest.raises(SettingsError, match=r"PATHGEN_TARGET_MPP.*did you mean PATHGEN_PATCH__TARGET_MPP\b"):
        load_settings(environ={"PATHGEN_TARGET_MPP": "0.25"})
    with pytest.raises(SettingsError, match=r"PATHGEN_S3_ENDPOINT\b.*did you mean PATHGEN_S3_ENDPOINT_URL\?"):
        load_settings(environ={"PATHGEN_S3_ENDPOINT": "http://x"})
    # Variables read elsewhere are not settings and stay accepted.
    assert load_settings(environ=dict.fromkeys(NON_SETTING_ENV_VARS, "x")) == load_settings(environ={})


def test_every_pathgen_variable_the_repository_uses_is_a_setting_or_allowed():
    root = Path(__file__).resolve().parent.parent
    skipped = {".venv", ".git", "store", "build", "_work", "__pycache__", "node_modules"}
    suffixes = {".py", ".sh", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
    used: dict[str, str] = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if set(relative.parts) & skipped or relative.parts[0].endswith(".egg-info") or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue  # this file names wrong variables on purpose
        if path.suffix in suffixes or path.name == "Makefile" or path.name.startswith("Dockerfile"):
            for line in path.read_text(errors="replace").splitlines():
                if "deliberately unknown" in line:
                    continue  # a test of the error for a mistyped variable
                for name in re.findall(r"\bPATHGEN_[A-Z0-9_]*[A-Z0-9]", line):
                    used.setdefault(name, str(relative))
    assert "PATHGEN_S3_ENDPOINT_URL" in used and "PATHGEN_HOME" in used  # the scan does see the repository
    for name, where in sorted(used.items()):
        if name not in NON_SETTING_ENV_VARS:
            try:
                load_settings(environ={name: "1"})
            except SettingsError as err:
                assert "unknown setting" not in str(err), f"{where} uses {name}: add it to NON_SETTING_ENV_VARS"


def test_settings_are_pydantic_settings_with_the_layers_in_order(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from pydantic_settings import BaseSettings

    assert issubclass(Settings, BaseSettings)
    config = tmp_path / "pathgen.yaml"
    config.write_text("patch: {patch_px: 512, target_mpp: 1.0, jpeg_quality: 70}\nagents: {summarize: {model: m}}\n")
    env = {"PATHGEN_PATCH__PATCH_PX": "448", "PATHGEN_PATCH__TARGET_MPP": "2.0"}
    s = load_settings(config, ["patch.patch_px=256"], environ=env)
    assert (s.patch.jpeg_quality, s.patch.target_mpp, s.patch.patch_px) == (70, 2.0, 256)  # file < env < --set
    # One field of a section, at any layer, keeps the section's other defaults.
    summarize = s.agents.summarize
    assert (summarize.model, summarize.prompt, summarize.max_words) == ("m", "summarize.v1", 120)
    whole = load_settings(overrides=["agents.describe={model: d}"], environ={})
    assert (whole.agents.describe.model, whole.agents.describe.prompt) == ("d", "describe.v1")
    # A bare Settings() reads the process environment (and refuses an unknown PATHGEN_* variable there too).
    monkeypatch.setenv("PATHGEN_PATCH__PATCH_PX", "300")
    assert Settings().patch.patch_px == 300 and Settings(store="s3://b").store == "s3://b"
    monkeypatch.setenv("PATHGEN_PATCH__PATCH_P", "300")
    with pytest.raises(SettingsError, match="PATHGEN_PATCH__PATCH_PX"):
        Settings()

    # The inputs of one build never leak into another running at the same time.
    def patch_px_of(px: int) -> int:
        return load_settings(environ={"PATHGEN_PATCH__PATCH_PX": str(px)}).patch.patch_px

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(patch_px_of, range(64, 96)))
    assert sizes == list(range(64, 96))


def test_a_whole_map_replaces_the_lower_layers_map_and_an_entry_joins_it(tmp_path):
    config = tmp_path / "pathgen.yaml"
    config.write_text("slides:\n  mpp_overrides: {a: 1, b: 2}\n")
    assert load_settings(config, environ={}).slides.mpp_overrides == {"a": 1.0, "b": 2.0}
    entry = load_settings(config, environ={"PATHGEN_SLIDES__MPP_OVERRIDES__C": "3"})
    assert entry.slides.mpp_overrides == {"a": 1.0, "b": 2.0, "c": 3.0}
    whole = load_settings(config, ["slides.mpp_overrides={c: 3}", "slides.mpp_overrides.d=4"], environ={})
    assert whole.slides.mpp_overrides == {"c": 3.0, "d": 4.0}
    assert load_settings(config, ["slides.mpp_overrides={}"], environ={}).slides.mpp_overrides == {}
    # The same between the environment and the file, and between the command line and the environment.
    env = {"PATHGEN_SLIDES__MPP_OVERRIDES": "{z: 3}"}
    assert load_settings(config, environ=env).slides.mpp_overrides == {"z": 3.0}
    both = load_settings(config, ["slides.mpp_overrides.d=4"], environ=env)
    assert both.slides.mpp_overrides == {"z": 3.0, "d": 4.0}
