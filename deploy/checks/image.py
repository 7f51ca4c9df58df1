"""The image's build inputs: deploy/Dockerfile and the root .dockerignore.

    image.py REPOSITORY_ROOT

* Every FROM that is not an earlier stage names its image by digest
  (`name:tag@sha256:<64 hex>`), so a rebuild pulls the bytes that were
  reviewed, not whatever the tag points at today.
* .dockerignore exists at the root (Docker reads no other) and keeps out
  target/ and .git/, yet none of its patterns hides what `COPY . .` and
  `cargo build --locked` need: the workspace manifests and lock file, and
  every member crate's manifest, sources, build script and the files those
  include. Patterns are matched the way Docker does for the simple forms
  used here (`dir/`, `**/x`, `*.ext`, plain paths); `!` exceptions are not
  interpreted, so the check refuses them.

Prints one ERROR line per finding on stderr; exits 1 when there is any.
"""
import fnmatch
import os
import re
import sys

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
MUST_IGNORE = ["target/x", ".git/HEAD"]


def from_lines(dockerfile):
    stages = set()
    for n, line in enumerate(open(dockerfile), 1):
        m = re.match(r"\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            yield n, m.group(1), m.group(1).lower() in stages
            if m.group(2):
                stages.add(m.group(2).lower())


def patterns(path):
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def ignored(pattern, rel):
    """Whether `pattern` hides `rel` (a path relative to the context)."""
    p = pattern.lstrip("/").rstrip("/")
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for prefix in prefixes:
        if fnmatch.fnmatchcase(prefix, p):
            return True
        if p.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], p[3:]):
            return True
    return False


def needed_files(root):
    """What the build reads from the context."""
    needed = ["Cargo.toml", "Cargo.lock"]
    manifest = open(os.path.join(root, "Cargo.toml")).read()
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", manifest)
    for member in re.findall(r'"([^"]+)"', members.group(1) if members else ""):
        base = os.path.join(root, member)
        for dirpath, dirnames, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, root)
            # Tests, benches and examples are not built by `cargo build -p`,
            # but cargo reads their declarations; sources and assets are read.
            for f in files:
                if f.endswith((".rs", ".toml", ".proto", ".ttf")):
                    needed.append(os.path.join(rel_dir, f).replace(os.sep, "/"))
    return needed


def main():
    root = sys.argv[1]
    errors = []
    dockerfile = os.path.join(root, "deploy", "Dockerfile")
    for n, image, is_stage in from_lines(dockerfile):
        if not is_stage and not DIGEST.search(image):
            errors.append(f"deploy/Dockerfile:{n}: FROM {image} is not pinned by digest (@sha256:...)")

    ignore = os.path.join(root, ".dockerignore")
    if not os.path.exists(ignore):
        errors.append(".dockerignore is missing at the repository root")
    else:
        pats = list(patterns(ignore))
        for p in pats:
            if p.startswith("!"):
                errors.append(f".dockerignore: exception {p} is not supported by this check")
        for rel in MUST_IGNORE:
            if not any(ignored(p, rel) for p in pats):
                errors.append(f".dockerignore: {rel.split('/')[0]}/ is sent to the build")
        for rel in needed_files(root):
            hit = next((p for p in pats if ignored(p, rel)), None)
            if hit:
                errors.append(f".dockerignore: `{hit}` hides {rel}, which the build needs")

    for e in errors:
        print(f"ERROR - image: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
