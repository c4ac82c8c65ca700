"""The explorer's server: a FastAPI app over probe runs (``lurker serve``) and its static
export (``lurker export``). See docs/explorer.md for the JSON API."""

from .app import create_app
from .export import export_site, static_path, static_segment
from .state import NotServableError

__all__ = ["NotServableError", "create_app", "export_site", "static_path", "static_segment"]
