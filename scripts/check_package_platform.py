"""Check that the compiled libraries in a deployment package match the functions' architecture.

A package built on a developer's machine can pick up wheels for that machine instead of
Lambda's (for example macOS or aarch64 numpy on an x86_64 function), and the function then
fails at import. This reads the architecture of each function from the packaged
CloudFormation template, then the ELF header of every shared library in the zip files.

Usage: python scripts/check_package_platform.py TEMPLATE_JSON ZIP [ZIP ...]
Exits 1 and names each mismatching library.
"""

from __future__ import annotations

import json
import sys
import zipfile

# e_machine values from the ELF specification.
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "arm64"}


def function_architectures(template_path: str) -> set[str]:
    """Return the architectures the template's Lambda functions declare."""
    with open(template_path, encoding="utf-8") as handle:
        resources = json.load(handle)["Resources"]
    architectures = set()
    for resource in resources.values():
        if resource.get("Type") == "AWS::Lambda::Function":
            architectures.update(resource["Properties"].get("Architectures", ["x86_64"]))
    return architectures


def library_machine(archive: zipfile.ZipFile, name: str) -> str:
    """Return the architecture of one shared library in ``archive``, from its ELF header."""
    with archive.open(name) as handle:
        header = handle.read(20)
    if header[:4] != b"\x7fELF":
        return "not an ELF file"
    byte_order = "little" if header[5] == 1 else "big"
    machine = int.from_bytes(header[18:20], byte_order)
    return ELF_MACHINES.get(machine, f"ELF machine 0x{machine:x}")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    architectures = function_architectures(argv[0])
    if len(architectures) != 1:
        print(f"check-package-platform: functions declare several architectures {sorted(architectures)}, "
              "but the stack builds one package for all of them", file=sys.stderr)
        return 1
    (expected,) = architectures

    mismatches = []
    checked = 0
    for zip_path in argv[1:]:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                if not (name.endswith(".so") or ".so." in name.rsplit("/", 1)[-1]):
                    continue
                checked += 1
                machine = library_machine(archive, name)
                if machine != expected:
                    mismatches.append(f"{zip_path}: {name} is {machine}, expected {expected}")

    for line in mismatches:
        print(f"check-package-platform: {line}", file=sys.stderr)
    if mismatches:
        print("check-package-platform: rebuild the package with pip's --platform set for the target "
              "architecture (see pythonRequirements in serverless.yml)", file=sys.stderr)
        return 1
    if checked == 0:
        print("check-package-platform: no shared libraries found; is numpy missing from the package?", file=sys.stderr)
        return 1
    print(f"check-package-platform: {checked} shared libraries, all {expected}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
