"""`make docs`: the README, WORKSPACE.md and docs/ as a browsable static site, by MkDocs in
strict mode (a broken link or anchor fails the build).

MkDocs reads one directory, and the pages live in three places (the README and the map at
the top, the rest in docs/), so the site's sources are staged: the README becomes the home
page and every link is rewritten to where its target lands (``docs/usage.md`` from the README
is ``usage.md`` there, ``../README.md`` from docs/ is ``index.md``). Folders of the source
tree (``hmlstm_jax/``, …) are not pages: their links become the folder's name in code.

    python docs/build_site.py [--out build/site]

Why MkDocs (not Sphinx, which Flax uses): every page here is Markdown already, read on GitHub
as it is; MkDocs builds it without a second syntax (Sphinx would need MyST and a conf.py),
and its strict mode fails on a link to a missing page or anchor, which is what this build
is for.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (--root for the tests)
NAV = [("Home", "index.md"), ("Using the library", "usage.md"),
       ("Reproducing the paper", "reproduce.md"), ("What the studies measured", "study.md"),
       ("Performance", "performance.md"), ("Several processes and Cloud TPU", "scale.md"),
       ("Reading of the paper", "decisions.md"), ("Map of the repository", "WORKSPACE.md")]


def _relink(text: str, page: str) -> str:
  """``page``'s links (a path relative to the repository) as seen from the staged site."""
  here = os.path.dirname(page)

  def one(match: re.Match) -> str:
    label, link = match.group(1), match.group(2)
    if re.match(r"[a-z]+:", link):
      return match.group(0)
    path, hash_, anchor = link.partition("#")
    target = os.path.normpath(os.path.join(here, path)) if path else page
    if target == "README.md":
      staged = "index.md"
    elif target == "WORKSPACE.md":
      staged = "WORKSPACE.md"
    elif target.startswith("docs" + os.sep):
      staged = os.path.relpath(target, "docs")
    else:  # a folder or file of the source tree: not part of the site
      return label if label.startswith("`") else f"`{label}`"
    site_here = "" if page in ("README.md", "WORKSPACE.md") else os.path.relpath(here, "docs")
    new = os.path.relpath(staged, site_here or ".") if path else ""
    return f"[{label}]({new}{hash_}{anchor})"
  return re.sub(r"\[([^\]]*)\]\(([^)\s]+)\)", one, text)


def stage(root: str, into: str) -> None:
  """The site's sources in ``into``: ``root``'s docs/ (its pages relinked), the README as
  index.md and WORKSPACE.md."""
  shutil.copytree(os.path.join(root, "docs"), into, dirs_exist_ok=True,
                  ignore=shutil.ignore_patterns("build_site.py", "__pycache__"))
  pages = [("README.md", "index.md"), ("WORKSPACE.md", "WORKSPACE.md")] + [
      (os.path.relpath(os.path.join(d, f), root),
       os.path.relpath(os.path.join(d, f), os.path.join(root, "docs")))
      for d, _, names in os.walk(os.path.join(root, "docs")) for f in names if f.endswith(".md")]
  for page, staged in pages:
    with open(os.path.join(root, page), encoding="utf-8") as f:
      text = f.read()
    with open(os.path.join(into, staged), "w", encoding="utf-8") as f:
      f.write(_relink(text, page))


def config(docs_dir: str, site_dir: str) -> str:
  """mkdocs.yml: strict about links and anchors, the pages in the order of NAV."""
  nav = "\n".join(f"  - {title!r}: {page}" for title, page in NAV)
  return (f"site_name: hmlstm_jax\ndocs_dir: {docs_dir}\nsite_dir: {site_dir}\n"
          "strict: true\nuse_directory_urls: false\ntheme: mkdocs\n"
          "markdown_extensions: [tables, fenced_code, toc]\n"
          "validation:\n  nav: {omitted_files: info}\n"
          "  links: {not_found: warn, anchors: warn, absolute_links: warn, unrecognized_links: warn}\n"
          f"nav:\n{nav}\n")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "build", "site"),
                      help="where the site is written (default build/site)")
  parser.add_argument("--root", default=ROOT, help="the repository whose pages are built")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="hmlstm_jax_site_") as tmp:
    sources = os.path.join(tmp, "pages")
    stage(args.root, sources)
    yml = os.path.join(tmp, "mkdocs.yml")
    with open(yml, "w", encoding="utf-8") as f:
      f.write(config(sources, os.path.abspath(args.out)))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "-f", yml])
  if result.returncode:
    print(f"build_site: MkDocs failed (exit {result.returncode}): see its warnings above",
          file=sys.stderr)
    return 1
  print(f"site: {os.path.join(args.out, 'index.html')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
