"""Sphinx extension with the site's small fixes (loaded through ``sphinx.local_extensions``).

- sphinx-thebe registers its inline configuration script (``const THEBE_JS_URL = ...``) once in the
  registry and once directly on the HTML builder; Sphinx 7 keeps both copies (one with filename ``''``,
  one with ``None``), and the second ``const`` declaration is a JavaScript error on every page. Inline
  scripts with the same body and attributes are emitted once.
"""

from __future__ import annotations


def _key(js) -> tuple:
    return (str(js.filename or ""), js.priority, tuple(sorted((k, str(v)) for k, v in js.attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for js in scripts:
        key = _key(js)
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
