"""Package discovery (metadata lives in pyproject.toml).

The serving stack's code sits in top-level folders, as the repository layout promises (services/ next
to protos/, k8s/, ...), but installs under the liveserve namespace so nothing claims a generic
top-level name like `services` in site-packages.
"""

from setuptools import find_packages, setup

MAPPED = {"liveserve.services": "services", "liveserve.loadtest": "loadtest", "liveserve.orchestration": "orchestration"}

packages = find_packages(include=["liveserve", "liveserve.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=MAPPED)
