"""Map the architecture folders into the single import package `nubes`.

pyproject.toml holds all metadata; this file exists only because setuptools
cannot discover sub-packages of remapped folders declaratively.
"""

from setuptools import find_packages, setup

# `nubes` itself is a namespace package: a folder named `nubes` at the top
# would shadow the mapped sub-packages for tools run from the repository root.
ROOTS = {
    "nubes.runtime": "runtime",
    "nubes.api": "api",
    "nubes.controllers": "controllers",
    "nubes.drivers": "drivers",
    "nubes.agent": "agent",
}

packages = []
for package, folder in ROOTS.items():
    packages.append(package)
    packages.extend(f"{package}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=ROOTS)
