"""A local web app for iclora: look at the data, start and watch a run, complete panels.

    python -m iclora.app                          # http://127.0.0.1:7860, the current folder as workspace
    python -m iclora.app --workspace ~/loras --port 8000
    python -m iclora.app --listen                 # every address of this machine (with a warning)
    iclora ui ...                                 # the same

Every path typed into the page is a path inside the workspace. The app needs Gradio:
`pip install 'iclora[ui]'`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Sequence

INSTALL_HINT = "error: the web app needs Gradio, which is not installed: pip install 'iclora[ui]'"
LOCAL = "127.0.0.1"


def parse_args(argv: Sequence[str] | None, prog: str = "python -m iclora.app") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=".", help="The folder the app reads and writes in (default: here).")
    parser.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    parser.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                        help="Bind ADDRESS (default with the flag: 0.0.0.0, every address) instead of 127.0.0.1: "
                             "anyone who reaches it can use the workspace and start runs.")
    parser.add_argument("--share", action="store_true",
                        help="Also open a public *.gradio.live link through Gradio's relay (off unless asked).")
    parser.add_argument("--max_upload_mb", type=float, default=50.0, help="Largest file the page accepts (MB).")
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error(f"--max_upload_mb must be positive, got {args.max_upload_mb}")
    return args


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None, prog: str = "python -m iclora.app") -> None:
    """`prog`: how the usage names the command (`iclora ui` runs this too)."""
    args = parse_args(argv, prog)
    # Gradio would otherwise report usage to its makers and look for newer versions online.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2) from None
    from ..logs import setup_logging
    from .ui import build_app
    from .workspace import Workspace

    setup_logging()
    try:
        workspace = Workspace(args.workspace)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    host = args.listen or LOCAL
    if not is_loopback(host):
        print(f"warning: --listen {host}: anyone who can reach this machine can use the app, read and write "
              f"{workspace.root} and start runs on it", file=sys.stderr)
    os.chdir(workspace.root)  # relative paths of runs started here resolve inside the workspace
    demo = build_app(workspace)
    _, local_url, share_url = demo.launch(
        server_name=host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True,
        max_file_size=int(args.max_upload_mb * 1024 * 1024), allowed_paths=[str(workspace.root)],
        ssr_mode=False, mcp_server=False, show_error=False,
    )
    print(f"iclora app running at {local_url} (workspace {workspace.root}; Ctrl-C stops it, not the runs it started)",
          flush=True)
    if share_url:
        print(f"public link (--share): {share_url}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        demo.close()


if __name__ == "__main__":
    main()
