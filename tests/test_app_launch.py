"""`python -m iclora.app`: where it listens, what it says, and the one line without Gradio.

The page itself is tested in test_app_browser.py; here Gradio's launch is replaced by a
recorder, so these run without Gradio installed.

    pytest tests/test_app_launch.py
"""

import sys
import types

import pytest

from iclora.app.__main__ import INSTALL_HINT, main


class FakeDemo:
    def __init__(self):
        self.launched = None

    def launch(self, **options):
        self.launched = options
        host = options["server_name"]
        return None, f"http://{host}:{options['server_port'] or 7860}/", "https://x.gradio.live" if options["share"] else None

    def block_thread(self):
        pass


@pytest.fixture
def demo(monkeypatch, tmp_path):
    """main() with Gradio's launch recorded; the workspace is tmp_path."""
    fake = FakeDemo()
    monkeypatch.setitem(sys.modules, "gradio", types.ModuleType("gradio"))
    ui = types.ModuleType("iclora.app.ui")
    ui.build_app = lambda workspace: fake
    monkeypatch.setitem(sys.modules, "iclora.app.ui", ui)
    monkeypatch.chdir(tmp_path)  # main() enters the workspace; undone after the test
    # main() sets it (before importing Gradio) for its process: set here, it is undone after the test.
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    return fake


def test_starts_on_localhost_with_one_line(demo, capsys, tmp_path):
    main(["--workspace", str(tmp_path), "--port", "7999"])
    out, err = capsys.readouterr()
    assert demo.launched["server_name"] == "127.0.0.1" and demo.launched["server_port"] == 7999
    assert demo.launched["share"] is False  # no public link unless asked
    assert demo.launched["max_file_size"] == 50 * 1024 * 1024 and demo.launched["allowed_paths"] == [str(tmp_path)]
    assert out.splitlines() == [f"iclora app running at http://127.0.0.1:7999/ (workspace {tmp_path}; "
                                "Ctrl-C stops it, not the runs it started)"]
    assert err == ""


def test_listen_binds_another_address_with_a_warning(demo, capsys, tmp_path):
    main(["--workspace", str(tmp_path), "--listen"])
    out, err = capsys.readouterr()
    assert demo.launched["server_name"] == "0.0.0.0"
    assert err.startswith("warning: --listen 0.0.0.0: anyone who can reach this machine can use the app")
    main(["--workspace", str(tmp_path), "--listen", "192.168.1.5", "--max_upload_mb", "2"])
    assert demo.launched["server_name"] == "192.168.1.5" and demo.launched["max_file_size"] == 2 * 1024 * 1024
    assert capsys.readouterr().err.startswith("warning: --listen 192.168.1.5:")
    main(["--workspace", str(tmp_path), "--listen", "127.0.0.1"])
    assert "warning" not in capsys.readouterr().err


def test_share_only_when_asked(demo, capsys, tmp_path):
    main(["--workspace", str(tmp_path), "--share"])
    out, _ = capsys.readouterr()
    assert demo.launched["share"] is True and "public link (--share): https://x.gradio.live" in out


def test_without_gradio_one_line_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # main() sets it for its process
    with pytest.raises(SystemExit) as stop:
        main(["--workspace", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err == INSTALL_HINT + "\n"
    assert "pip install 'iclora[ui]'" in INSTALL_HINT


def test_missing_workspace_is_one_error_line(demo, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["--workspace", str(tmp_path / "nope")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: --workspace {tmp_path / 'nope'}: no such folder\n"


def test_iclora_ui_is_the_same_command(demo, capsys, tmp_path):
    from iclora.commands import main as iclora

    iclora(["ui", "--workspace", str(tmp_path), "--port", "7998"])
    assert demo.launched["server_name"] == "127.0.0.1" and demo.launched["server_port"] == 7998
    assert capsys.readouterr().out.startswith("iclora app running at http://127.0.0.1:7998/")
    with pytest.raises(SystemExit):
        iclora(["ui", "--help"])
    assert capsys.readouterr().out.startswith("usage: iclora ui")
