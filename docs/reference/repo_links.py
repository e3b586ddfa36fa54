"""mkdocs hook (mkdocs.yml ``hooks:``): a link from a page to a file of the repository outside ``docs/``
(``../examples/transactional.py``) works when browsing the repository but not on the built site; point it at
the file in the repository instead (``repo_url``/blob/main/...). Links to files that do not exist are left
alone, so that ``mkdocs build --strict`` still fails on them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    here = Path(page.file.abs_src_path).parent

    def rewrite(match: re.Match[str]) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("/", "mailto:")):
            return match[0]
        path = (here / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(repo) or not path.exists():
            return match[0]
        kind = "tree" if path.is_dir() else "blob"
        url = f"{config['repo_url'].rstrip('/')}/{kind}/main/{path.relative_to(repo).as_posix()}"
        return f"]({url}{match['anchor'] or ''})"

    return LINK.sub(rewrite, markdown)
