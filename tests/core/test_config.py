"""The group's TOML configuration: the valid form, and every error path of parse_config.

Every problem must be a ConfigError (exit code 2) naming the key or table
that is wrong, so a person can fix the file.
"""

from __future__ import annotations

import pytest

from coalesce_core.config import GroupConfig, ReplicaConfig, SourceConfig, load_config, parse_config, replica_block
from coalesce_core.cycle.state import RetryPolicy
from coalesce_core.errors import ConfigError
from coalesce_core.retention import Policy

FULL = """\
# a complete group
[group]
name = "home.v2"
source = "sim:///srv/src"
destination = "btrfs:///mnt/pool/dst"
parallel = 8
interval = 90.5
metadata = "/var/lib/coalesce"

[group.retry]
initial = 15
factor = 1.5
maximum = 600

[[replica]]
name = "A"
source = "srcA"

[[replica]]
name = "B"
"""

MIN = """\
[group]
name = "g"
source = "mem://s"
destination = "mem://d"
"""


def group_with(**kv) -> str:
    """MIN with keys of [group] replaced (None removes the key)."""
    base = {"name": '"g"', "source": '"mem://s"', "destination": '"mem://d"'}
    base.update(kv)
    lines = ["[group]"] + [f"{k} = {v}" for k, v in base.items() if v is not None]
    return "\n".join(lines) + "\n"


def err(text: str, path: str = "cfg.toml") -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, path)
    assert ei.value.exit_code == 2
    assert path in str(ei.value), f"the message should name the file: {ei.value}"
    return ei.value


def test_full_config_parses_to_the_right_group_config():
    cfg = parse_config(FULL, "/etc/coalesce/home.toml")
    assert cfg == GroupConfig(
        name="home.v2",
        sources=(SourceConfig(name="default", url="sim:///srv/src"),),
        destination="btrfs:///mnt/pool/dst",
        parallel=8,
        interval=90.5,
        metadata="/var/lib/coalesce",
        retry=RetryPolicy(initial=15.0, factor=1.5, maximum=600.0),
        replicas=(ReplicaConfig(name="A", source="srcA"), ReplicaConfig(name="B", source="B")),
        path="/etc/coalesce/home.toml",
    )
    assert str(cfg.ledger_path(None)) == "/var/lib/coalesce/home.v2.sqlite"


def test_defaults():
    cfg = parse_config(MIN)
    assert (cfg.parallel, cfg.interval, cfg.metadata, cfg.retry, cfg.replicas) == (4, 300.0, None, RetryPolicy(), ())
    assert isinstance(cfg.interval, float)
    assert str(cfg.ledger_path("/vol/.coalesce")) == "/vol/.coalesce/g.sqlite"
    with pytest.raises(ConfigError, match="metadata") as ei:
        cfg.ledger_path(None)
    assert "metadata" in ei.value.hint


def test_missing_group_table():
    e = err('[[replica]]\nname = "A"\n')
    assert "[group]" in str(e) and e.hint


def test_group_that_is_not_a_table():
    assert "[group]" in str(err('group = "x"\n'))


@pytest.mark.parametrize("key", ["name", "source", "destination"])
def test_missing_required_key(key):
    e = err(group_with(**{key: None}))
    assert f"`{key}`" in str(e) and "missing" in str(e)
    assert key in e.hint


@pytest.mark.parametrize("key", ["name", "source", "destination"])
def test_required_key_of_wrong_type(key):
    assert f"`{key}`" in str(err(group_with(**{key: "42"})))


@pytest.mark.parametrize("bad", ['"a b"', '"-lead"', '".dot"', '"x/y"', '""', '"' + "a" * 65 + '"', '"ü"', '"a:b"'])
def test_bad_group_name(bad):
    e = err(group_with(name=bad))
    assert "not a valid name" in str(e) and "[group]" in str(e)


def test_name_of_64_characters_is_fine():
    assert parse_config(group_with(name='"' + "a" * 64 + '"')).name == "a" * 64


def test_same_source_and_destination():
    assert "same volume" in str(err(group_with(destination='"mem://s"')))


def test_same_volume_spelt_two_ways():
    err(group_with(destination='"MEM://s"'))


@pytest.mark.parametrize("value", ["0", "257", "-1", "1.5", "true", '"4"'])
def test_bad_parallel(value):
    assert "`parallel`" in str(err(group_with(parallel=value)))


@pytest.mark.parametrize("value", ["1", "256"])
def test_parallel_bounds_are_inclusive(value):
    assert parse_config(group_with(parallel=value)).parallel == int(value)


@pytest.mark.parametrize("value", ["0", "-5", "true", "[1]", '"0s"', '"soon"', '"5 minutes"'])
def test_bad_interval(value):
    e = err(group_with(interval=value))
    assert "`interval`" in str(e) and 'interval = "5m"' in e.hint


def test_nan_interval():
    assert "`interval`" in str(err(group_with(interval="nan")))


def test_reseed_after_and_max_lag():
    cfg = parse_config(MIN)
    assert (cfg.reseed_after, cfg.max_lag) == (3, None)
    cfg = parse_config(group_with(reseed_after="0", max_lag='"15m"'))
    assert (cfg.reseed_after, cfg.max_lag) == (0, 900.0)
    assert parse_config(group_with(max_lag="3600")).max_lag == 3600.0


@pytest.mark.parametrize("value", ["-1", "1.5", "true", '"3"'])
def test_bad_reseed_after(value):
    assert "`reseed_after`" in str(err(group_with(reseed_after=value)))


@pytest.mark.parametrize("value", ['"soon"', '"-1h"', '"0s"', "0", "true", '"15 minutes"'])
def test_bad_max_lag(value):
    e = err(group_with(max_lag=value))
    assert "`max_lag`" in str(e) and e.hint


def test_straggler_after_is_an_optional_duration():
    assert parse_config(MIN).straggler_after is None  # the cycle waits for every update
    assert parse_config(group_with(straggler_after='"90s"')).straggler_after == 90.0
    assert parse_config(group_with(straggler_after='"15m"')).straggler_after == 900.0
    assert parse_config(group_with(straggler_after="7200")).straggler_after == 7200.0


@pytest.mark.parametrize("value", ['"soon"', '"-1h"', '"0s"', "0", "true"])
def test_bad_straggler_after(value):
    e = err(group_with(straggler_after=value))
    assert "`straggler_after`" in str(e) and e.hint


def test_privileges_default_to_strip_and_take_keep():
    assert parse_config(MIN).privileges == "strip"
    assert parse_config(group_with(privileges='"keep"')).privileges == "keep"
    assert parse_config(group_with(privileges='"strip"')).privileges == "strip"


@pytest.mark.parametrize("value", ['"Keep"', '"none"', "true", '""', "1"])
def test_bad_privileges(value):
    e = err(group_with(privileges=value))
    assert "`privileges`" in str(e) and "keep" in e.hint


def test_bad_metadata_type():
    assert "`metadata`" in str(err(group_with(metadata="3")))


@pytest.mark.parametrize(
    "retry",
    [
        "initial = -1",
        "factor = 0.5",
        "maximum = -3",
        'initial = "soon"',
        "initial = [1]",
        "initial = nan",
    ],
)
def test_bad_retry_value(retry):
    e = err(MIN + "[group.retry]\n" + retry + "\n")
    assert "retry" in str(e)


@pytest.mark.parametrize(
    "retry, key",
    [
        ("initial = -1", "initial"),
        ("factor = 0.5", "factor"),
        ('maximum = "3 hours"', "maximum"),
        ("factor = true", "factor"),
    ],
)
def test_a_bad_retry_value_names_its_key_and_gives_an_example(retry, key):
    e = err(MIN + "[group.retry]\n" + retry + "\n")
    assert f"[group.retry]: `{key}`" in str(e) and f"{key} = " in e.hint


def test_times_are_durations_or_seconds():
    text = group_with(interval='"15m"') + '[group.retry]\ninitial = "90s"\nfactor = 3\nmaximum = "2h"\n'
    cfg = parse_config(text)
    assert (cfg.interval, cfg.retry.initial, cfg.retry.factor, cfg.retry.maximum) == (900.0, 90.0, 3.0, 7200.0)
    cfg = parse_config(group_with(interval="45") + "[group.retry]\ninitial = 0\nmaximum = 60\n")
    assert (cfg.interval, cfg.retry.initial, cfg.retry.maximum) == (45.0, 0.0, 60.0)


def test_unknown_retry_key():
    e = err(MIN + "[group.retry]\ninitial = 1\njitter = 2\n")
    assert "[group.retry]" in str(e) and "initial, factor, maximum" in str(e)


def test_retry_that_is_not_a_table():
    assert "retry" in str(err(group_with(retry="5")))


def test_unknown_group_key():
    e = err(group_with(paralel="4"))
    assert "paralel" in str(e) and "parallel" in e.hint


def test_unknown_top_level_table():
    e = err(MIN + "[replicas]\nname = 'x'\n")
    assert "replicas" in str(e) and e.hint


def test_unknown_replica_key():
    e = err(MIN + '[[replica]]\nname = "A"\nsrc = "B"\n')
    assert "src" in str(e) and "[[replica]] #1" in str(e)


def test_replica_without_name():
    e = err(MIN + '[[replica]]\nname = "A"\n[[replica]]\nsource = "B"\n')
    assert "`name`" in str(e) and "[[replica]] #2" in str(e)


@pytest.mark.parametrize("block", ['name = "a b"', 'name = "A"\nsource = "../etc"', 'name = "A"\nsource = 3'])
def test_replica_bad_names(block):
    e = err(MIN + "[[replica]]\n" + block + "\n")
    assert "[[replica]] #1" in str(e)


def test_duplicate_replica():
    e = err(MIN + '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n[[replica]]\nname = "A"\n')
    assert "'A' appears twice" in str(e) and "#3" in str(e)


def test_replica_key_that_is_not_an_array_of_tables():
    assert "[[replica]]" in str(err('replica = "A"\n' + MIN))


def test_replica_array_of_non_tables():
    err("replica = [1, 2]\n" + MIN)


def test_invalid_toml_reports_the_line():
    text = MIN + "parallel = \n"
    e = err(text)
    assert "not valid TOML" in str(e) and "line 5" in str(e)
    assert "line" in e.hint


@pytest.mark.parametrize("url", ['"nourl"', '"://x"', '"mem://"', '"bad scheme://x"'])
@pytest.mark.parametrize("key", ["source", "destination"])
def test_bad_volume_url(url, key):
    with pytest.raises(ConfigError, match="not a volume URL") as ei:
        parse_config(group_with(**{key: url}), "cfg.toml")
    assert "scheme://" in ei.value.hint


@pytest.mark.parametrize("key", ["source", "destination"])
def test_bad_volume_url_names_the_key_and_file(key):
    e = err(group_with(**{key: '"nourl"'}))
    assert f"`{key}`" in str(e)
    assert "nourl" in str(e)


def test_load_config_of_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file") as ei:
        load_config(tmp_path / "missing.toml")
    assert str(tmp_path / "missing.toml") in str(ei.value) and "--config" in ei.value.hint


def test_load_config_of_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_load_config_reads_the_file_and_records_its_path(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text(FULL)
    cfg = load_config(p)
    assert cfg.path == str(p) and cfg.name == "home.v2"


@pytest.mark.parametrize("base", [FULL, MIN, MIN.rstrip("\n")])
def test_replica_block_appended_to_a_config_reparses(base):
    text = base + replica_block("C.new", "src-c")
    cfg = parse_config(text)
    assert cfg.replicas[-1] == ReplicaConfig(name="C.new", source="src-c")
    assert len(cfg.replicas) == len(parse_config(base).replicas) + 1


def test_replica_block_after_a_retry_table():
    text = MIN + "[group.retry]\ninitial = 1\n" + replica_block("Z", "Z")
    cfg = parse_config(text)
    assert cfg.retry.initial == 1.0 and cfg.replicas == (ReplicaConfig("Z", "Z"),)


def test_replica_block_for_an_existing_name_is_caught():
    with pytest.raises(ConfigError, match="appears twice"):
        parse_config(FULL + replica_block("A", "other"))


def test_a_relative_metadata_path_is_relative_to_the_config_file_not_the_working_directory(tmp_path, monkeypatch):
    from coalesce_core.config import load_config

    conf = tmp_path / "etc" / "home.toml"
    conf.parent.mkdir()
    conf.write_text('[group]\nname = "home"\nsource = "mem://s"\ndestination = "mem://d"\nmetadata = "state"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(conf)
    assert cfg.ledger_path(None) == tmp_path / "etc" / "state" / "home.sqlite"


# --------------------------------------------------------------- a destination apart from its source
def overlap_err(source: str, destination: str) -> ConfigError:
    e = err(group_with(source=f'"{source}"', destination=f'"{destination}"'))
    assert "replicate into a volume of its own" in e.hint
    return e


def test_the_source_spelt_with_a_trailing_slash_is_the_same_volume(tmp_path):
    """`source = "sim:///x"` with `destination = "sim:///x/"` was accepted, and a rollback then deleted a
    file from the source."""
    assert "is the source" in str(overlap_err(f"sim://{tmp_path}/x", f"sim://{tmp_path}/x/"))
    assert "is the source" in str(overlap_err(f"sim://{tmp_path}/x?disks=2", f"sim://{tmp_path}/./x"))


def test_a_symlink_to_the_source_is_the_same_volume(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "x")
    assert "is the source" in str(overlap_err(f"sim://{tmp_path}/x", f"sim://{tmp_path}/link"))
    assert "is the source" in str(overlap_err(f"btrfs://{tmp_path}/link", f"sim://{tmp_path}/x"))


def test_a_hard_link_of_a_file_volume_is_the_same_volume(tmp_path):
    (tmp_path / "a.vol").write_bytes(b"")
    (tmp_path / "b.vol").hardlink_to(tmp_path / "a.vol")
    assert "is the source" in str(overlap_err(f"mem://{tmp_path}/a.vol", f"mem://{tmp_path}/b.vol"))


def test_a_destination_inside_the_source_or_holding_it_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "in").symlink_to(tmp_path / "x")
    assert "lies inside" in str(overlap_err(f"sim://{tmp_path}/x", f"sim://{tmp_path}/x/replicas"))
    assert "lies inside" in str(overlap_err(f"sim://{tmp_path}/x", f"sim://{tmp_path}/in/replicas"))
    assert "holds" in str(overlap_err(f"sim://{tmp_path}/x/src", f"sim://{tmp_path}/x"))


def test_zfs_datasets_are_compared_by_name():
    assert "is the source" in str(overlap_err("zfs://pool/a", "zfs://pool/a/"))
    assert "lies inside" in str(overlap_err("zfs://pool/a", "zfs://pool/a/b"))
    assert parse_config(group_with(source='"zfs://pool/a"', destination='"zfs://pool/ab"')).destination


def test_volumes_apart_are_fine(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path)
    for source, destination in [
        (f"sim://{tmp_path}/a", f"sim://{tmp_path}/ab"),
        (f"sim://{tmp_path}/a", f"sim://{tmp_path}/link/b"),
        (f"tls://host:7450/{tmp_path}/a", f"sim://{tmp_path}/a"),  # a remote source is another host's
        ("mem://a", "mem://a-b"),
    ]:
        assert parse_config(group_with(source=f'"{source}"', destination=f'"{destination}"')).source == source


def test_transfer_deadlines():
    """[group] transfer_stall (default 10 minutes) and transfer_timeout (default none); 0 is no limit
    (coalesce_core/deadlines.py, docs/config.md "Deadlines")."""
    assert (parse_config(MIN).deadlines.stall, parse_config(MIN).deadlines.total) == (600.0, None)
    cfg = parse_config(group_with(transfer_stall='"90s"', transfer_timeout='"12h"'))
    assert (cfg.deadlines.stall, cfg.deadlines.total) == (90.0, 43200.0)
    cfg = parse_config(group_with(transfer_stall="0", transfer_timeout='"0s"'))
    assert (cfg.deadlines.stall, cfg.deadlines.total) == (None, None)


@pytest.mark.parametrize("key", ["transfer_stall", "transfer_timeout"])
@pytest.mark.parametrize("value", ['"soon"', '"-1h"', "-5", "true", '"15 minutes"'])
def test_bad_transfer_deadline(key, value):
    e = err(group_with(**{key: value}))
    assert f"`{key}`" in str(e) and "0 for no limit" in e.hint


def test_spool_bounds():
    """[group] spool_max (default 4 GiB) and spool_group_max (default 16 GiB): sizes, at least 1M."""
    assert (parse_config(MIN).spool_max, parse_config(MIN).spool_group_max) == (4 << 30, 16 << 30)
    cfg = parse_config(group_with(spool_max='"512M"', spool_group_max='"2GiB"'))
    assert (cfg.spool_max, cfg.spool_group_max) == (512 << 20, 2 << 30)


@pytest.mark.parametrize("key", ["spool_max", "spool_group_max"])
@pytest.mark.parametrize("value", ['"lots"', '"-1G"', "true", '"4 gigabytes"', '"100K"', "0"])
def test_bad_spool_bound(key, value):
    e = err(group_with(**{key: value}))
    assert f"`{key}`" in str(e) and e.hint


def test_retention_defaults_to_no_retention():
    assert parse_config(MIN).retention == Policy()


def test_retention_table():
    """[retention] (docs/config.md, "Retention"): keep_min a duration, keep the calendar buckets, max, prefer_complete."""
    cfg = parse_config(
        MIN + '[retention]\nkeep_min = "1d"\nkeep = "24h 14d 8w 12m 2y"\nmax = 60\nprefer_complete = true\n'
    )
    assert cfg.retention == Policy(keep_min=86400.0, keep="24h 14d 8w 12m 2y", max=60, prefer_complete=True)
    assert parse_config(MIN + '[retention]\nkeep = "7d"\n').retention == Policy(keep="7d")
    assert parse_config(MIN + "[retention]\nkeep_min = 3600\n").retention == Policy(keep_min=3600.0)


@pytest.mark.parametrize(
    "body, words",
    [
        ('keep = "14x"', ["`keep`", "unknown unit 'x'"]),
        ('keep = "0d"', ["`keep`", "at least 1"]),
        ('keep = "7d 3d"', ["`keep`", "twice"]),
        ("keep = 14", ["`keep`", "text"]),
        ('keep_min = "soon"', ["`keep_min`"]),
        ('keep_min = "-1d"', ["`keep_min`"]),
        ('keep = "7d"\nmax = 0', ["`max`"]),
        ('keep = "7d"\nmax = "10"', ["`max`"]),
        ('keep = "7d"\nmax = true', ["`max`"]),
        ("max = 10", ["alone it keeps nothing"]),
        ('keep = "7d"\nprefer_complete = "yes"', ["`prefer_complete`"]),
        ('keep = "7d"\nkeep_last = 3', ["unknown key", "keep_last"]),
    ],
)
def test_bad_retention(body, words):
    e = err(MIN + "[retention]\n" + body + "\n")
    assert "[retention]" in str(e) and e.hint
    for word in words:
        assert word in str(e)


def test_retention_that_is_not_a_table():
    e = err('retention = "7d"\n' + MIN)
    assert "[retention]" in str(e) and "must be a table" in str(e)


# --------------------------------------------------------------- sources ([[source]], docs/config.md "Sources")
GROUP = """\
[group]
name = "g"
destination = "sim:///srv/dst"
"""

TWO = (
    GROUP
    + """
[[source]]
name = "lab"
url = "sim:///srv/lab"

[[source]]
name = "office"
url = "tls://office.example:7450/home"
interval = "15m"
parallel = 2
[source.tls]
ca = "/etc/coalesce/office-ca.crt"
server_name = "office"
[source.transfer]
bandwidth = "20MiB/s"
retries = 5

[[replica]]
name = "A"
from = "lab"

[[replica]]
name = "B"
source = "home"
from = "office"
"""
)


TLS = "tls://h:7450/vol"


def source(*lines: str, url: str = "sim:///srv/s", name: str = "s") -> str:
    """A [[source]] table named ``name`` with ``url`` and ``lines``."""
    return "\n".join(["", "[[source]]", f'name = "{name}"', f'url = "{url}"', *lines, ""])


def test_two_sources_parse_with_their_settings_and_replicas():
    cfg = parse_config(TWO, "cfg.toml")
    assert cfg.sources == (
        SourceConfig(name="lab", url="sim:///srv/lab"),
        SourceConfig(
            name="office",
            url="tls://office.example:7450/home",
            interval=900.0,
            parallel=2,
            transport=(
                ("tls", (("ca", "/etc/coalesce/office-ca.crt"), ("server_name", "office"))),
                ("transfer", (("bandwidth", "20MiB/s"), ("retries", 5))),
            ),
        ),
    )
    assert cfg.replicas == (
        ReplicaConfig(name="A", source="A", origin="lab"),
        ReplicaConfig(name="B", source="home", origin="office"),
    )
    assert cfg.sources[0].options() is None
    assert cfg.sources[1].options() == {
        "tls": {"ca": "/etc/coalesce/office-ca.crt", "server_name": "office"},
        "transfer": {"bandwidth": "20MiB/s", "retries": 5},
    }


def test_the_group_source_is_the_shorthand_of_one_source_named_default():
    cfg = parse_config(MIN + '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\nfrom = "default"\n')
    assert cfg.sources == (SourceConfig(name="default", url="mem://s"),)
    assert cfg.source == "mem://s"
    assert [r.origin for r in cfg.replicas] == ["default", "default"]


def test_one_source_table_takes_the_replicas_without_from():
    cfg = parse_config(GROUP + source(name="only") + '[[replica]]\nname = "A"\n')
    assert cfg.replicas == (ReplicaConfig(name="A", source="A", origin="only"),)
    assert cfg.source == "sim:///srv/s"


def test_several_sources_are_runnable_but_have_no_sole_url():
    """The agent opens each source by its name (``source_named``); what speaks of one source
    (``source``, ``with_source``) says which sources there are."""
    cfg = parse_config(TWO, "cfg.toml")
    assert cfg.source_named("office").url == "tls://office.example:7450/home"
    with pytest.raises(ConfigError) as ei:
        cfg.source_named("attic")
    assert "no source named 'attic'" in str(ei.value) and "'lab', 'office'" in ei.value.hint
    with pytest.raises(ConfigError) as ei:
        cfg.source
    assert "2 sources ('lab', 'office')" in str(ei.value) and "from" in ei.value.hint
    with pytest.raises(ConfigError, match="2 sources"):
        cfg.with_source("mem://x")


def test_a_source_with_an_interval_or_a_parallel_of_its_own_is_runnable():
    """The agent takes a PCPI of such a source only when it is due and runs at most ``parallel`` of its
    transfers at once (tests/core/test_agent_fan_in.py)."""
    cfg = parse_config(TWO, "cfg.toml")
    office = cfg.source_named("office")
    assert (office.interval, office.parallel) == (900.0, 2)
    assert parse_config(GROUP + source("interval = 60", "parallel = 2", name="one", url=TLS)).source == TLS


def test_a_sole_sources_transport_tables_are_what_its_backend_is_opened_with():
    """They override the process-wide client settings (tests/net/test_tls_security.py runs a cycle so)."""
    cfg = parse_config(GROUP + source("[source.tls]", 'ca = "/ca.crt"', name="one", url=TLS), "cfg.toml")
    assert cfg.source == TLS
    assert cfg.source_options == {"tls": {"ca": "/ca.crt"}}
    assert parse_config(GROUP + source(name="one", url=TLS)).source_options is None


def test_with_source_replaces_the_url_of_the_sole_source():
    cfg = parse_config(GROUP + source("interval = 60", name="one"))
    moved = cfg.with_source("mem://elsewhere")
    assert moved.sources == (SourceConfig(name="one", url="mem://elsewhere", interval=60.0),)
    assert parse_config(MIN).with_source("mem://x").source == "mem://x"
    assert moved.destination == cfg.destination


@pytest.mark.parametrize(("text", "seconds"), [('"90s"', 90.0), ('"15m"', 900.0), ('"2h"', 7200.0), ('"1d"', 86400.0)])
def test_a_source_interval_is_a_duration(text, seconds):
    assert parse_config(GROUP + source(f"interval = {text}")).sources[0].interval == seconds


def test_a_source_is_due_every_cycle_without_interval_and_after_it_with_one():
    every, hourly = SourceConfig(name="a", url="mem://a"), SourceConfig(name="b", url="mem://b", interval=3600.0)
    assert every.due(last_pcpi=1000.0, now=1000.0) and every.due(last_pcpi=None, now=0.0)
    assert hourly.due(last_pcpi=None, now=5.0)
    assert not hourly.due(last_pcpi=1000.0, now=4599.0)
    assert hourly.due(last_pcpi=1000.0, now=4600.0)


@pytest.mark.parametrize("value", ['"0s"', "0", '"soon"', "true", "-5"])
def test_bad_source_interval(value):
    e = err(GROUP + source(f"interval = {value}"))
    assert "[[source]] 's'" in str(e) and "`interval`" in str(e) and e.hint


@pytest.mark.parametrize("value", ["1", "256"])
def test_source_parallel_bounds_are_inclusive(value):
    assert parse_config(GROUP + source(f"parallel = {value}")).sources[0].parallel == int(value)


@pytest.mark.parametrize("value", ["0", "257", "1.5", "true", '"2"'])
def test_bad_source_parallel(value):
    e = err(GROUP + source(f"parallel = {value}"))
    assert "[[source]] 's'" in str(e) and "`parallel`" in str(e) and "group's `parallel`" in e.hint


def test_group_source_and_source_tables_together_are_refused():
    e = err(MIN + source())
    assert "[group]" in str(e) and "both name sources" in str(e)
    assert "[[source]]" in e.hint and "short form" in e.hint


def test_no_source_at_all():
    e = err(GROUP)
    assert "missing `source`" in str(e) and "[[source]]" in e.hint


@pytest.mark.parametrize("text", ['source = "mem://s"\n', "source = []\n", "[source]\nname = 'a'\n", "source = [1]\n"])
def test_source_that_is_not_an_array_of_tables(text):
    e = err(text + GROUP)
    assert "[[source]]" in str(e) and e.hint


def test_source_without_name_or_url():
    e = err(GROUP + '\n[[source]]\nurl = "mem://a"\n')
    assert "[[source]] #1" in str(e) and "missing `name`" in str(e) and e.hint
    e = err(GROUP + source(name="a") + '\n[[source]]\nname = "b"\n')
    assert "[[source]] 'b'" in str(e) and "missing `url`" in str(e) and "url" in e.hint


def test_bad_source_name_and_url():
    e = err(GROUP + source(name="a b"))
    assert "[[source]] #1" in str(e) and "not a valid name" in str(e) and e.hint
    e = err(GROUP + source(url="nourl"))
    assert "[[source]] 's'" in str(e) and "`url`" in str(e) and "scheme://" in e.hint
    e = err(GROUP + source(url="mem://s").replace('url = "mem://s"', "url = 5"))
    assert "`url` has the wrong type (int)" in str(e) and e.hint


def test_unknown_source_key():
    e = err(GROUP + source("intervall = 60"))
    assert "[[source]] #1" in str(e) and "intervall" in str(e) and "interval" in e.hint


def test_duplicate_source_name():
    e = err(GROUP + source(url="mem://a") + source(url="mem://b") + '[[replica]]\nname = "A"\nfrom = "s"\n')
    assert "[[source]] 's'" in str(e) and "'s' appears twice" in str(e) and "unique" in e.hint


def test_a_source_that_is_the_destination_or_overlaps_it(tmp_path):
    dest = f"sim://{tmp_path}/d"
    text = f'[group]\nname = "g"\ndestination = "{dest}"\n'
    e = err(text + source(url=dest))
    assert "[[source]] 's'" in str(e) and "`url`" in str(e) and "same volume" in str(e) and e.hint
    e = err(text + source(url=f"sim://{tmp_path}/d/"))
    assert "[[source]] 's'" in str(e) and "is the source" in str(e) and "apart from the source" in e.hint
    e = err(text + source(url=f"sim://{tmp_path}") + source(url="mem://x", name="t"))
    assert "lies inside the source" in str(e)


@pytest.mark.parametrize(
    ("first", "second", "relation"),
    [
        ("mem://a", "MEM://a", "is"),
        ("tls://h:7450/vol", "tls://h:7450/vol", "is"),
        ("sim://{tmp}/a", "sim://{tmp}/a/", "is"),
        ("sim://{tmp}/a", "sim://{tmp}/a/b", "lies inside"),
        ("sim://{tmp}/a/b", "sim://{tmp}/a", "holds"),
        ("zfs://pool/a", "zfs://pool/a/b", "lies inside"),
    ],
)
def test_two_sources_on_one_volume_or_overlapping_are_refused(tmp_path, first, second, relation):
    first, second = first.format(tmp=tmp_path), second.format(tmp=tmp_path)
    e = err(GROUP + source(url=first, name="one") + source(url=second, name="two"))
    assert f"[[source]] 'two': `url`: {second} {relation} the volume of source 'one' ({first})" in str(e)
    assert "same `from`" in e.hint


def test_sources_apart_are_fine(tmp_path):
    cfg = parse_config(
        GROUP + source(url=f"sim://{tmp_path}/a", name="one") + source(url=f"sim://{tmp_path}/ab", name="two")
    )
    assert [s.name for s in cfg.sources] == ["one", "two"]


def test_a_replica_from_an_undefined_source():
    e = err(TWO + '[[replica]]\nname = "C"\nfrom = "home"\n')
    assert "[[replica]] #3" in str(e) and "`from`" in str(e) and "'home'" in str(e)
    assert "'lab', 'office'" in e.hint
    e = err(MIN + '[[replica]]\nname = "A"\nfrom = "lab"\n')
    assert "no source is named 'lab'" in str(e) and "'default'" in e.hint


def test_a_replica_without_from_among_several_sources():
    e = err(TWO + '[[replica]]\nname = "C"\n')
    assert "[[replica]] #3" in str(e) and "no `from`" in str(e) and "2 sources" in str(e)
    assert "from = " in e.hint and "'lab', 'office'" in e.hint


def test_a_replica_from_of_the_wrong_type():
    e = err(MIN + '[[replica]]\nname = "A"\nfrom = 1\n')
    assert "[[replica]] #1" in str(e) and "`from` has the wrong type" in str(e)


@pytest.mark.parametrize(
    ("url", "table"),
    [
        ("sim:///srv/s", "tls"),
        ("sim:///srv/s", "transfer"),
        ("mem://s", "ssh"),
        ("zfs://pool/s", "transfer"),
        ("ssh://h/sim:///srv/s", "tls"),
        (TLS, "ssh"),
    ],
)
def test_transport_tables_on_a_source_they_do_nothing_for_are_refused(url, table):
    e = err(GROUP + source(f"[source.{table}]", 'command = "x"' if table == "ssh" else "", url=url))
    assert f"[[source]] 's' [source.{table}]" in str(e) and "would do nothing" in str(e)
    assert f"remove it: [source.{table}]" in e.hint


def test_transport_tables_of_a_remote_source():
    cfg = parse_config(
        GROUP
        + source(
            "[source.transfer]",
            'compression = "zstd"',
            "timeout = 60",
            "retry_delay = 0.5",
            "[source.ssh]",
            'command = ["ssh", "-i", "/root/key"]',
            'remote_command = "coalesce serve --stdio"',
            url="ssh://backup@h/btrfs:///mnt/pool/home",
        )
    )
    assert cfg.sources[0].options() == {
        "transfer": {"compression": "zstd", "timeout": 60, "retry_delay": 0.5},
        "ssh": {"command": ["ssh", "-i", "/root/key"], "remote_command": "coalesce serve --stdio"},
    }
    hash(cfg)  # frozen and hashable like every config record


@pytest.mark.parametrize(
    ("table", "line", "type_name"),
    [
        ("tls", "cert = 5", "int"),
        ("tls", "ca = true", "bool"),
        ("transfer", "retries = 1.5", "float"),
        ("transfer", "retries = true", "bool"),
        ("transfer", 'timeout = "30"', "str"),
        ("transfer", "bandwidth = [1]", "list"),
        ("transfer", "compression = 1", "int"),
    ],
)
def test_transport_values_of_the_wrong_type(table, line, type_name):
    e = err(GROUP + source(f"[source.{table}]", line, url=TLS))
    assert f"[[source]] 's' [source.{table}]" in str(e) and f"has the wrong type ({type_name})" in str(e)
    assert "Client settings" in e.hint


def test_ssh_command_of_the_wrong_type():
    e = err(GROUP + source("[source.ssh]", 'command = ["ssh", 1]', url="ssh://h/mem://s"))
    assert "`command` has the wrong type (list)" in str(e)


def test_unknown_transport_key_and_a_transport_key_that_is_not_a_table():
    e = err(GROUP + source("[source.tls]", 'certificate = "c"', url=TLS))
    assert "[source.tls]" in str(e) and "certificate" in str(e) and "cert" in e.hint
    e = err(GROUP + source('tls = "c"', url=TLS))
    assert "`tls` must be a table ([source.tls])" in str(e) and e.hint


def test_remove_keeps_the_source_tables(tmp_path):
    from coalesce_core.config import without_replica

    out = without_replica(TWO, "A", "cfg.toml")
    cfg = parse_config(out, "cfg.toml")
    assert [r.name for r in cfg.replicas] == ["B"] and cfg.sources == parse_config(TWO).sources


def test_a_source_sets_its_own_transfer_deadlines_and_inherits_the_rest():
    """A [[source]] table's transfer_stall / transfer_timeout apply to its transfers; what it leaves out
    is the group's (docs/config.md, "Deadlines")."""
    text = """
[group]
name = "g"
destination = "mem://d"
transfer_stall = "5m"
transfer_timeout = "2h"
[[source]]
name = "near"
url = "mem://near"
[[source]]
name = "far"
url = "mem://far"
transfer_stall = "1h"
[[source]]
name = "free"
url = "mem://free"
transfer_timeout = 0
[[replica]]
name = "A"
from = "near"
"""
    cfg = parse_config(text)
    limits = {s: (cfg.limits_for(s).stall, cfg.limits_for(s).total) for s in ("near", "far", "free")}
    assert limits == {"near": (300.0, 7200.0), "far": (3600.0, 7200.0), "free": (300.0, None)}
    bad = text.replace('transfer_stall = "1h"', 'transfer_stall = "soon"')
    e = err(bad)
    assert "[[source]] 'far'" in str(e) and "`transfer_stall`" in str(e) and "0 for no limit" in e.hint
