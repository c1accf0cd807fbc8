import pytest
import yaml

from charrnn.config import Config, load_config, serve_config_from_args
from charrnn.errors import ConfigError
from charrnn.typed import load_yaml
from tests.conftest import ROOT


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(str(ROOT / "configs" / "alice.yaml"), ["model.hidden_size=128"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.data.seq_len >= 1


def test_overrides_are_typed():
    cfg = load_config(None, ["model.hidden_size=256", "train.lr=1e-3", "data.lowercase=false",
                             "scaling.gpus_per_worker=0.5", "data.drop_chars=123"])
    assert cfg.model.hidden_size == 256 and cfg.train.lr == 1e-3
    assert cfg.data.lowercase is False and cfg.scaling.gpus_per_worker == 0.5
    assert cfg.data.drop_chars == "123"
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # ints widen to floats


@pytest.mark.parametrize("override,match", [
    ("model.hiden_size=3", r"unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'\?$"),
    ("hidden_size=3", r"unknown config key 'hidden_size'; did you mean 'model.hidden_size'\?$"),
    ("train.lr_rate=1", r"unknown config key 'train.lr_rate'$"),  # nothing close enough
    ("nosuch.key=1", r"unknown config key 'nosuch.key'$"),
    ("model=3", "is a section"),
    ("model.hidden_size=big", "expected int"),
    ("train.epochs=1.5", "expected int"),
    ("data.lowercase=3", "expected bool"),
    ("model.cell=transformer", "lstm or gru"),
    ("data.val_fraction=0.9", "val_fraction"),
    # one field per message, with the value the user gave
    ("model.hidden_size=-1", r"model.hidden_size must be >= 1, got -1"),
    ("model.num_layers=0", r"model.num_layers must be >= 1, got 0"),
    ("train.grad_clip=-1", r"train.grad_clip must be a finite number >= 0 .*got -1.0"),
    # inf was accepted: an LR schedule whose time progress stayed 0, a Ray resource request
    # no cluster could supply
    ("train.max_minutes=inf", r"train.max_minutes must be a finite number >= 0 \(0: no limit\), "
                              r"got inf"),
    ("scaling.cpus_per_worker=inf", r"scaling.cpus_per_worker must be a finite number > 0, got inf"),
    ("scaling.gpus_per_worker=.inf", r"scaling.gpus_per_worker must be a finite number >= 0, or "
                                     r"unset, got inf"),
    ("train.lr=.inf", r"train.lr must be a finite number > 0, got inf"),
    ("train.lr=.nan", r"train.lr must be a finite number > 0, got nan"),
    ("train.sample_chars=-3", r"train.sample_chars must be >= 0, got -3"),
    ("train.log_every_steps=-1", r"train.log_every_steps must be >= 0"),
    ("train.precision=fp16", r"train.precision must be auto, bf16 or fp32, got 'fp16'"),
    ("train.seed=-1", r"train.seed must be an integer in \[0, 2\*\*32\), got -1"),  # was numpy's traceback
    ("train.seed=4294967296", r"train.seed must be an integer in \[0, 2\*\*32\)"),
    ("scaling.workers=-2", r"scaling.workers must be >= 0 .*got -2"),
    ("noequals", "key=value"),
    ("data.corpus=", r"data.corpus must be set .*got ''"),  # was "--corpus  is a directory"
    ("train.eval_max_chars=50", r"train.eval_max_chars must be 0 \(all\) or at least data.seq_len \(100\)"),
    # a run name is one directory under run.storage: never its parent, itself or a nested path
    ("run.name=..", r"run.name must be a non-empty name of printable characters without '/', "
                    r"other than '.' or '..', got '..'"),
    ("run.name=a\nb", r"run.name must be .*got 'a\\nb'"),  # a newline split the log lines
    ("run.name=.", r"run.name must be .*got '.'"),
    ("run.name=a/b", r"run.name must be .*got 'a/b'"),
    # an endpoint is checked with the config, before the corpus is read; a password is not shown
    ("run.s3_endpoint_url=minio:9000", r"run.s3_endpoint_url minio:9000 is not a valid URL; "
                                       r"expected http\(s\)://HOST\[:PORT\]$"),
    ("run.s3_endpoint_url=http://k:secret@minio:9000",
     r"run.s3_endpoint_url http://\*\*\*@minio:9000 carries a user name or password; it would be "
     "logged and saved in checkpoints: give S3 credentials in AWS_ACCESS_KEY_ID"),
])
def test_bad_overrides_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_ordinary_run_names_are_accepted():
    for name in ("alice", "alice-2026.11.29_v2", "A", "..a", "my run", "x y:z*?"):
        assert load_config(None, [f"run.name={name}", "scaling.workers=2"]).run.name == name
    assert load_config(None, ["run.name=élan"]).run.name == "élan"  # local mode


def test_a_ray_run_name_must_be_ascii():
    """Ray Train tags its metrics with the run name and Ray's tags are ASCII: `--workers 1
    --name élan` failed inside Ray's controller with a traceback (UnicodeEncodeError)."""
    with pytest.raises(ConfigError, match=r"run.name must be ASCII to train with Ray Train "
                                          r"workers \(--workers N\).*got 'élan'"):
        load_config(None, ["run.name=élan", "scaling.workers=1"])


def test_unknown_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key train.epochz; did you mean "
                                          r"'train.epochs'\?$"):
        load_config(str(p))
    p.write_text("train:\n  bogus: 3\n")  # nothing close: the section's keys are listed
    with pytest.raises(ConfigError, match=r"unknown config key train.bogus; valid keys under "
                                          r"train: epochs, "):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"^the config path is empty: give a YAML file"):
        load_config("")  # `--config ""` trained with the code's defaults


@pytest.mark.parametrize("content,match", [
    (b"a: b: c\n", r"invalid YAML: mapping values are not allowed here \(line 1, column 5\)$"),
    (b"train:\n  lr: [1\n", r"invalid YAML: expected ',' or ']'.* \(line 3, column 1\)$"),
    (b"\xff\xfe", r"not UTF-8 text \(byte offset 0\)"),  # was a UnicodeDecodeError traceback
    (b"- a\n- b\n", "top level must be a mapping of sections"),
    (b"model: 5\n", r"^model: expected a mapping, got 5$"),
    # PyYAML keeps the last of two keys: the second `train:` dropped `epochs: 1` silently
    (b"train:\n  epochs: 1\nmodel:\n  hidden_size: 32\ntrain:\n  lr: 0.01\n",
     r"invalid YAML: duplicate key 'train' \(first given on line 1\) \(line 5, column 1\)$"),
    (b"train: {lr: 0.1, lr: 0.2}\n", r"duplicate key 'lr' \(first given on line 1\)"),
])
def test_a_bad_config_file_is_one_line(tmp_path, content, match):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(str(p))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not found: .* \\(a directory\\)"):
        load_config(str(tmp_path))


def test_yaml_merge_keys_may_be_overridden():
    # `<<: *base` then a key of base is YAML's override, not a duplicate
    assert load_yaml("b: &x {a: 1, c: 2}\nd:\n  <<: *x\n  a: 3\n")["d"] == {"a": 3, "c": 2}


def test_string_settings_take_any_text_from_set():
    assert load_config(None, ["data.drop_chars=[{"]).data.drop_chars == "[{"
    assert load_config(None, ["data.drop_chars=123"]).data.drop_chars == "123"
    # spaces, quotes and '#' are characters too (YAML dropped ' ' and ' #', and read '"a"' as a)
    for chars in (" ", "ab #", '"a"', "\t", "'"):
        assert load_config(None, [f"data.drop_chars={chars}"]).data.drop_chars == chars
    # The text is lower-cased before characters are dropped: an upper-case one would drop nothing.
    with pytest.raises(ConfigError, match=r"data.drop_chars has upper-case 'AÉ', which a "
                                          r"lower-cased text never contains; give 'aé' instead"):
        load_config(None, ["data.drop_chars=A.É!A"])
    assert load_config(None, ["data.drop_chars=A.", "data.lowercase=false"]).data.drop_chars == "A."
    with pytest.raises(ConfigError, match=r"--set train.lr: cannot parse value '\[1': .*\(line 1"):
        load_config(None, ["train.lr=[1"])


@pytest.mark.parametrize("args,match", [
    ({"checkpoint": "x", "max_prompts": "0"}, r"serve.max_prompts must be >= 1, got 0"),
    ({"checkpoint": "x", "max_prompt_chars": 0}, r"serve.max_prompt_chars must be >= 1, got 0"),
    ({"checkpoint": "x", "precision": "fp16"}, r"serve.precision must be fp32, bf16 or int8, got 'fp16'"),
    ({}, r"checkpoint"),
    # inf: the watcher thread died (OverflowError) and a lone request waited for a full batch
    ({"checkpoint": "x", "watch_interval_s": "inf"},
     r"serve.watch_interval_s must be a finite number >= 0 \(0: never\), got inf"),
    ({"checkpoint": "x", "batch_wait_timeout_s": float("inf")},
     r"serve.batch_wait_timeout_s must be a finite number >= 0, got inf"),
    ({"checkpoint": "x", "max_char_limit": "9"},  # `serve run ... max_char_limit=9`
     r"unknown config key serve.max_char_limit; did you mean 'serve.max_chars_limit'\?$"),
])
def test_bad_serve_args_name_the_field(args, match):
    with pytest.raises(ConfigError, match=match):
        serve_config_from_args(args)


@pytest.mark.parametrize("amx,avx512_bf16", [(False, False), (True, False), (False, True)])
def test_auto_precision_is_bf16_where_the_cpu_has_bf16_matmuls(monkeypatch, amx, avx512_bf16):
    """AMX (Intel Sapphire Rapids) and AVX512-BF16 (AMD Zen 4): on a 2-core Zen 4, bf16 autocast
    trained configs/alice.yaml 1.3x faster than fp32, and `auto` had picked fp32 there."""
    import torch

    from charrnn import optim
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert optim.native_bf16(torch.device("cpu")) == (amx or avx512_bf16)
    ctx = optim.autocast(torch.device("cpu"), "auto")
    assert isinstance(ctx, torch.autocast) == (amx or avx512_bf16)


def test_the_readme_names_every_setting():
    """The README's config table lists each training setting under its section, and its Serve
    section each builder arg and request field: a setting added to the code is documented too."""
    import dataclasses

    from charrnn.config import ServeConfig
    readme = (ROOT / "README.md").read_text()
    table = {line.split("|")[1].strip(" `"): line.split("|")[2] for line in readme.splitlines()
             if line.startswith("| `") and line.count("|") == 3}
    missing = [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
               for f in dataclasses.fields(getattr(Config(), section.name))
               if f"`{f.name}`" not in table.get(section.name, "")]
    serve = readme[readme.index("### Serving"):readme.index("### Kubernetes")]
    missing += [f"serve {f.name}" for f in dataclasses.fields(ServeConfig) if f"`{f.name}`" not in serve]
    from charrnn.api import GenerateRequest  # the request body's fields, in the same section
    missing += [f"request {name}" for name in GenerateRequest.model_fields if f"`{name}`" not in serve]
    assert not missing, f"not in README.md: {missing}"


def test_the_readme_names_every_flag_of_the_jobs():
    import re
    readme = (ROOT / "README.md").read_text()
    flags = {(job.name, flag) for job in (ROOT / "jobs").glob("*.py")
             for flag in re.findall(r'add_argument\(\s*"(--[a-z-]+)"', job.read_text())}
    assert len(flags) > 20
    missing = sorted(f"{job} {flag}" for job, flag in flags
                     if not re.search(f"`{re.escape(flag)}[` ]", readme))
    assert not missing, f"not in README.md: {missing}"
