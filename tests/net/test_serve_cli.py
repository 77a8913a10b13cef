"""`coalesce serve` as a command: the sub-parser the CLI wires in, and its errors."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest

from coalesce_remote import serve
from coalesce_remote.protocol import PREAMBLE


def test_add_serve_command_builds_the_verb():
    p = argparse.ArgumentParser(prog="coalesce")
    sub = p.add_subparsers(dest="verb")
    serve.add_serve_command(sub)
    args = p.parse_args(
        ["serve", "--stdio", "--config", "/etc/x.toml", "--identity", "backup1", "--bandwidth", "20MiB/s"]
    )
    assert args.func is serve.run_serve and args.stdio and args.identity == "backup1"
    args = p.parse_args(["serve", "--listen", "127.0.0.1:7450", "--config", "/etc/x.toml"])
    assert args.listen == "127.0.0.1:7450"
    assert serve.parse_listen("[::1]:99") == ("::1", 99)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coalesce_remote.serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_clear_errors(tmp_path):
    r = _run("--stdio", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read the server config" in r.stderr
    cfg = tmp_path / "s.toml"
    cfg.write_text('[volumes]\nsrc = "mem://x"\n')
    r = _run("--stdio", "--config", str(cfg))
    assert r.returncode == 2 and "--identity" in r.stderr
    r = _run("--listen", "127.0.0.1:0", "--config", str(cfg))
    assert r.returncode == 2 and "cert, key and ca" in r.stderr


def test_stdio_speaks_only_the_protocol_on_stdout(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[volumes]\nsrc = "mem://x"\n[clients.a]\nvolumes = ["src"]\n')
    r = subprocess.run(
        [sys.executable, "-m", "coalesce_remote.serve", "--stdio", "--config", str(cfg), "--identity", "a"],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    assert r.stdout == PREAMBLE  # the preamble, then EOF from us: nothing else on stdout
    assert r.returncode == 0


def test_remote_urls_and_client_settings(tmp_path):
    import pytest

    from coalesce_core.backend.urls import VolumeURL
    from coalesce_core.errors import ConfigError
    from coalesce_remote.client import Target, load_settings

    t = Target.parse(VolumeURL.parse("ssh://backup@src1:2222/btrfs:///mnt/pool/home"))
    assert (t.user, t.host, t.port, t.volume) == ("backup", "src1", 2222, "btrfs:///mnt/pool/home")
    t = Target.parse(VolumeURL.parse("tls://[::1]:7450/home"))
    assert (t.host, t.port, t.volume) == ("::1", 7450, "home")
    assert Target.parse(VolumeURL.parse("tls://src1/home")).port == serve.DEFAULT_PORT
    with pytest.raises(ConfigError, match="not a remote volume URL"):
        Target.parse(VolumeURL.parse("tls://src1"))
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[tls]\ncert = "c"\nkey = "k"\nca = "a"\n[transfer]\nbandwidth = "1MiB/s"\nretries = 5\n'
        '[ssh]\ncommand = "ssh -i key"\n'
    )
    s = load_settings({"COALESCE_CLIENT_CONFIG": str(cfg), "COALESCE_RETRIES": "7"})
    assert (s.cert, s.key, s.ca, s.bandwidth, s.retries, s.ssh) == ("c", "k", "a", 1024 * 1024, 7, ("ssh", "-i", "key"))
    with pytest.raises(ConfigError, match="compression"):
        load_settings({"COALESCE_COMPRESSION": "lzma"})


CLIENT_FILE = """\
[tls]
cert = "/etc/c.crt"
key = "/etc/c.key"
ca = "/etc/ca.crt"
[transfer]
bandwidth = "1MiB/s"
retries = 5
compression = "zlib"
[ssh]
command = "ssh -i key"
"""


def test_a_sources_tables_override_the_process_wide_settings_key_by_key(tmp_path):
    """docs/network.md, "Client settings": one parse serves the COALESCE_CLIENT_CONFIG file and a
    source's [source.tls], [source.transfer], [source.ssh] tables; a source's keys win, its absent
    keys keep the process-wide values (the file, then the environment)."""
    from coalesce_remote.client import ClientSettings, load_settings, settings_fields, with_options

    cfg = tmp_path / "client.toml"
    cfg.write_text(CLIENT_FILE)
    base = load_settings({"COALESCE_CLIENT_CONFIG": str(cfg), "COALESCE_TIMEOUT": "12"})
    options = {
        "tls": {"ca": "/etc/office-ca.crt", "server_name": "office"},
        "transfer": {"bandwidth": "20MiB/s", "retry_delay": 0.5, "compression": "None"},
        "ssh": {"command": ["ssh", "-p", "22"], "remote_command": "coalesce serve --stdio --quiet"},
    }
    s = with_options(base, options, "source tls://h/v")
    assert s == ClientSettings(
        cert="/etc/c.crt",
        key="/etc/c.key",
        ca="/etc/office-ca.crt",
        server_name="office",
        compression="none",
        bandwidth=20 * 1024 * 1024,
        retries=5,
        retry_delay=0.5,
        timeout=12.0,
        ssh=("ssh", "-p", "22"),
        ssh_remote_command="coalesce serve --stdio --quiet",
    )
    assert with_options(base, None, "x") is base and with_options(base, {}, "x") is base
    assert with_options(base, {"transfer": {"bandwidth": 0}}, "x").bandwidth is None  # 0: no limit of its own
    file_tables = {"tls": {"cert": "/etc/c.crt"}, "transfer": {"retries": "7"}, "ssh": {"command": "ssh -i k"}}
    assert settings_fields(file_tables, "x") == {"cert": "/etc/c.crt", "retries": 7, "ssh": ("ssh", "-i", "k")}


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"transfer": {"bandwidth": "fast"}}, "`bandwidth`: not a bandwidth"),
        ({"transfer": {"retries": "many"}}, "`retries`: invalid literal"),
        ({"transfer": {"timeout": [1]}}, "`timeout`: float() argument"),
        ({"transfer": {"compression": "lzma"}}, "compression 'lzma' is not one of"),
        ({"transfer": {"retries": -1}}, "retries must be >= 0"),
        ({"transfer": {"timeout": 0}}, "timeout > 0"),
        ({"tls": {"certificate": "c"}}, "[tls]: unknown key(s) ['certificate']"),
        ({"server": {}}, "unknown table(s) ['server']"),
        ({"tls": "c"}, "[tls] must be a table"),
    ],
)
def test_a_bad_value_in_a_sources_tables_names_the_source(options, said):
    from coalesce_core.errors import ConfigError
    from coalesce_remote.client import ClientSettings, with_options

    with pytest.raises(ConfigError) as ei:
        with_options(ClientSettings(), options, "the transport settings of source tls://h:7450/v")
    assert str(ei.value).startswith("the transport settings of source tls://h:7450/v: ") and said in str(ei.value)
    assert ei.value.hint


def test_the_client_file_is_checked_as_a_sources_tables_are(tmp_path):
    from coalesce_core.errors import ConfigError
    from coalesce_remote.client import load_settings

    cfg = tmp_path / "client.toml"
    cfg.write_text('[transfer]\nbandwith = "1MiB/s"\n')
    with pytest.raises(ConfigError, match=r"client.toml: \[transfer\]: unknown key\(s\) \['bandwith'\]") as ei:
        load_settings({"COALESCE_CLIENT_CONFIG": str(cfg)})
    assert "bandwidth" in ei.value.hint
    with pytest.raises(ConfigError, match="client settings: `retries`"):
        load_settings({"COALESCE_RETRIES": "x"})


def test_the_open_hook_hands_a_source_its_settings(tmp_path, monkeypatch):
    """Volume.open(..., options=SourceConfig.options()) reaches the remote backend, which merges them
    over the process-wide settings before it connects; a bad value is refused before any connection."""
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.config import parse_config
    from coalesce_core.errors import ConfigError
    from coalesce_remote.client import RemoteVolume

    connected: list[RemoteVolume] = []
    monkeypatch.setattr(RemoteVolume, "connect", lambda self: connected.append(self))
    cfg = tmp_path / "client.toml"
    cfg.write_text(CLIENT_FILE)
    monkeypatch.setenv("COALESCE_CLIENT_CONFIG", str(cfg))
    group = parse_config(
        '[group]\nname = "g"\ndestination = "mem://d"\n'
        '[[source]]\nname = "office"\nurl = "tls://office.example:7450/home"\n'
        '[source.tls]\nca = "/etc/office-ca.crt"\n[source.transfer]\nretries = 1\n'
        '[[source]]\nname = "lab"\nurl = "tls://lab.example:7450/home"\n'
    )
    office, lab = group.sources
    pm = plugin_manager()  # the ssh and tls backends are installed (pyproject.toml entry points)
    vol = Volume.open(pm, office.url, options=office.options())
    assert connected == [vol.handle]
    assert (vol.handle.settings.ca, vol.handle.settings.retries, vol.handle.settings.cert) == (
        "/etc/office-ca.crt",
        1,
        "/etc/c.crt",
    )
    plain = Volume.open(pm, lab.url, options=lab.options())
    assert (plain.handle.settings.ca, plain.handle.settings.retries) == ("/etc/ca.crt", 5)
    with pytest.raises(ConfigError, match=r"source tls://office.example:7450/home: `bandwidth`"):
        Volume.open(pm, office.url, options={"transfer": {"bandwidth": "fast"}})
    assert len(connected) == 2


def test_a_busy_port_is_an_error_with_a_hint_not_an_internal_error(tmp_path, certs):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        f'[server]\ncert = "{certs.server[0]}"\nkey = "{certs.server[1]}"\nca = "{certs.ca}"\n'
        '[volumes]\nsrc = "mem://x"\n[clients.backup1]\nvolumes = ["src"]\n'
    )
    try:
        r = _run("--listen", f"127.0.0.1:{port}", "--config", str(cfg))
    finally:
        busy.close()
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "hint:" in r.stderr
    assert "internal error" not in r.stderr


def _stdio(cfg, identity: str = "a") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coalesce_remote.serve", "--stdio", "--config", str(cfg), "--identity", identity],
        input=b"",
        capture_output=True,
        timeout=60,
    )


def test_stdio_never_sends_the_server_log_to_the_client(tmp_path):
    """Behind ssh the client reads stdout and shows stderr: the log (here: a refused identity and
    the connection's end) goes to `log` in [server], else to syslog, never to either."""
    log = tmp_path / "serve.log"
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[server]\nlog = "{log}"\n[volumes]\nsrc = "mem://x"\n[clients.a]\nvolumes = ["src"]\n')
    r = _stdio(cfg, identity="who\nINFO forged")
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == PREAMBLE
    lines = log.read_text().splitlines()
    assert lines and all(" coalesce-serve[" in ln for ln in lines)
    assert any("connection from ssh:stdio (identity 'who\\nINFO forged')" in ln for ln in lines)
    cfg.write_text('[volumes]\nsrc = "mem://x"\n[clients.a]\nvolumes = ["src"]\n')  # no `log`
    r = _stdio(cfg)
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == PREAMBLE


def test_stdio_logs_to_syslog_without_a_log_file(tmp_path):
    """The handler --stdio gets without `log`: one datagram per record to the syslog socket, one line."""
    import logging
    import socket

    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    handler = serve.log_handler(serve.ServerConfig(), stdio=True, syslog=path)
    try:
        rec = logging.LogRecord("coalesce.serve", logging.WARNING, __file__, 1, "refused %s", ("x\ny\x1b",), None)
        handler.emit(rec)
        got = sock.recv(4096).decode()
    finally:
        handler.close()
        sock.close()
    assert got.startswith("<28>coalesce-serve[")  # daemon.warning
    assert got.rstrip("\x00").endswith("WARNING refused x\\ny\\x1b")
    assert isinstance(
        serve.log_handler(serve.ServerConfig(), stdio=True, syslog=str(tmp_path / "none")), logging.NullHandler
    )
    assert isinstance(serve.log_handler(serve.ServerConfig(), stdio=False), logging.StreamHandler)


HOSTILE_URLS = [
    (
        "ssh://-oProxyCommand=touch${IFS}/tmp/owned/mem://v",
        "the host '-oProxyCommand=touch${IFS}' starts with '-'",
    ),
    ("ssh://-oProxyCommand=x@src1/mem://v", "the user '-oProxyCommand=x' starts with '-'"),
    ("ssh://backup@-p1/mem://v", "the host '-p1' starts with '-'"),
    ("tls://-h:7450/home", "the host '-h:7450' starts with '-'"),
    ("ssh://src1 -oProxyCommand=x/mem://v", "holds whitespace"),
    ("ssh://src1\t/mem://v", "holds no control characters"),
    ("ssh://src1\x1b[2J/mem://v", "holds no control characters"),
    ("ssh://src1\n/mem://v", "holds no control characters"),
]


@pytest.mark.parametrize("url, why", HOSTILE_URLS)
def test_a_url_whose_host_or_user_could_be_an_option_is_refused_at_config_time(tmp_path, url, why):
    from coalesce_core.backend.urls import VolumeURL
    from coalesce_core.config import parse_config
    from coalesce_core.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(why)) as info:
        VolumeURL.parse(url)
    assert info.value.hint
    toml = f'[group]\nname = "g"\nsource = {json.dumps(url)}\ndestination = "mem://d"\n[[replica]]\nname = "A"\n'
    with pytest.raises(ConfigError, match=re.escape(why)):
        parse_config(toml, "g.toml")


def test_the_command_line_says_error_and_hint_for_such_a_url(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        '[group]\nname = "g"\nsource = "ssh://-oProxyCommand=touch@src1/mem://v"\ndestination = "mem://d"\n'
        f'metadata = "{tmp_path}/meta"\n[[replica]]\nname = "A"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "coalesce_core.ui.cli", "--config", str(cfg), "init"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines[-2].startswith("error: ") and "the user '-oProxyCommand=touch' starts with '-'" in lines[-2]
    assert lines[-1].startswith("hint: a user never starts with '-'")
    assert not (tmp_path / "meta").exists()


def test_the_ssh_argv_puts_the_host_after_double_dash():
    from coalesce_core.backend.urls import VolumeURL
    from coalesce_remote.client import ClientSettings, RemoteVolume

    v = RemoteVolume(
        VolumeURL.parse("ssh://backup@src1:2222/btrfs:///mnt/pool/home"),
        ClientSettings(ssh=("ssh", "-i", "key"), keepalive=7),
    )
    argv = v.ssh_argv()
    assert argv[:3] == ["ssh", "-i", "key"] and argv[-3:] == ["--", "src1", "coalesce serve --stdio"]
    assert argv.index("--") == len(argv) - 3  # nothing after the host but the remote command
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "backup"
    assert "ServerAliveInterval=7" in argv and argv.index("-T") < argv.index("--")


def test_a_hostile_host_is_refused_even_when_the_url_bypassed_the_config():
    from coalesce_core.backend.urls import VolumeURL
    from coalesce_core.errors import ConfigError
    from coalesce_remote.client import ClientSettings, RemoteVolume, Target

    for location in ("-oProxyCommand=x/mem://v", "-l@h/mem://v", "a b/mem://v"):
        with pytest.raises(ConfigError):
            Target.parse(VolumeURL(scheme="ssh", location=location))
        with pytest.raises(ConfigError):
            RemoteVolume(VolumeURL(scheme="ssh", location=location), ClientSettings())
