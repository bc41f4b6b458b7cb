"""The security settings without a running server: the key rule and the limits' validation (one line,
exit 2), --private-metrics, HEAD on routes added after create_app, and /docs without any CDN."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from captrt.cli import app as cli
from captrt.serve import ServeConfig, create_app


def config(tmp_path: Path, **options: object) -> ServeConfig:
    return ServeConfig(model=tmp_path / "no-model", **options)


@pytest.mark.parametrize("value,key", [("k1", "k1"), ("  k1\n", "k1"), ("\tk 1\r\n", "k 1")])
def test_the_key_is_stripped(tmp_path, monkeypatch, value, key):
    monkeypatch.setenv("CAPTRT_T_KEY", value)
    assert config(tmp_path, api_key_env="CAPTRT_T_KEY").api_key() == key


@pytest.mark.parametrize("args,env,message", [
    (["--api-key-env", "CAPTRT_T_KEY"], " \n", "CAPTRT_T_KEY: the environment variable is unset or empty"),
    (["--api-key-env", "CAPTRT_T_KEY"], "ab\ncd", "the key holds control or non-ASCII characters"),
    (["--api-key-env", "CAPTRT_T_KEY"], "clé", "the key holds control or non-ASCII characters"),
    (["--private-metrics"], None, "--private-metrics needs --api-key-env"),
    (["--header-timeout", "0"], None, "--header-timeout must be a finite number > 0, got 0.0"),
    (["--body-timeout", "inf"], None, "--body-timeout must be a finite number > 0"),
    (["--keep-alive-timeout", "-1"], None, "--keep-alive-timeout must be a finite number > 0"),
    (["--max-connections-per-client", "-1"], None, "--max-connections-per-client must be an integer >= 0"),
    (["--max-connections", "0"], None, "--max-connections must be a positive integer"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, monkeypatch, args, env, message):
    if env is not None:
        monkeypatch.setenv("CAPTRT_T_KEY", env)
    res = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), *args])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith("captrt: error: ") and message in res.output, res.output


def test_flags_reach_the_config(tmp_path, monkeypatch):
    seen: list[ServeConfig] = []
    monkeypatch.setattr("captrt.serve.server.serve", lambda c: seen.append(c) or 0)
    res = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--max-connections", "100",
                                   "--max-connections-per-client", "0", "--header-timeout", "2.5",
                                   "--body-timeout", "3", "--keep-alive-timeout", "4"])
    assert res.exit_code == 0, res.output
    c = seen[0]
    assert (c.max_connections, c.max_connections_per_client, c.header_timeout, c.body_timeout,
            c.keep_alive_timeout, c.private_metrics) == (100, 0, 2.5, 3.0, 4.0, False)
    defaults = ServeConfig(model=tmp_path)
    assert (defaults.max_connections_per_client, defaults.header_timeout, defaults.body_timeout,
            defaults.keep_alive_timeout) == (64, 10.0, 10.0, 5.0)


def test_private_metrics_need_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTRT_T_KEY", "k1")
    http = TestClient(create_app(config(tmp_path, api_key_env="CAPTRT_T_KEY", private_metrics=True)))
    for path in ("/metrics", "/readyz"):
        assert http.get(path).status_code == 401, path
        assert http.head(path).status_code == 401, path
        assert http.get(path, headers={"X-API-Key": "k1"}).status_code in (200, 503), path  # 503: no model here
    assert http.get("/healthz").status_code == 200  # liveness never needs the key
    open_app = TestClient(create_app(config(tmp_path, api_key_env="CAPTRT_T_KEY")))
    assert open_app.get("/metrics").status_code == 200 and open_app.get("/readyz").status_code == 503


def test_head_reaches_routes_added_later(tmp_path):
    """HEAD comes from the middleware, not from each route: a GET route added after create_app has it."""
    service = create_app(config(tmp_path))

    @service.get("/v2/example")
    async def example() -> dict[str, str]:
        return {"hello": "world"}

    http = TestClient(service)
    head, get = http.head("/v2/example"), http.get("/v2/example")
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert http.head("/no-such-path").status_code == 404


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_another_origin(tmp_path, page):
    http = TestClient(create_app(config(tmp_path)))
    html = http.get(page)
    assert html.status_code == 200
    assert "cdn." not in html.text and "googleapis" not in html.text
    links = _Links()
    links.feed(html.text)
    assert links.urls, html.text
    for url in links.urls:
        assert url.startswith("/"), url  # this origin only
        r = http.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url
    assert '"/openapi.json"' in html.text or "'/openapi.json'" in html.text
