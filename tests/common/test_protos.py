from services.common import protogen


def test_committed_stubs_are_fresh():
    assert protogen.main(["--check"]) == 0, "run `python -m services.common.protogen`"


def test_every_proto_field_has_a_comment():
    """House rule: a comment on every field of every message."""
    missing = []
    for proto in sorted(protogen.PROTO_ROOT.rglob("*.proto")):
        lines = proto.read_text().splitlines()
        in_message = False
        for n, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith(("message ", "enum ")):
                in_message = True
            elif stripped == "}":
                in_message = False
            elif in_message and "=" in stripped and not stripped.startswith("//"):
                previous = lines[n - 2].strip() if n > 1 else ""
                if "//" not in stripped and not previous.startswith("//"):
                    missing.append(f"{proto.name}:{n}: {stripped}")
    assert not missing, "fields without a comment:\n" + "\n".join(missing)
