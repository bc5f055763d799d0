#!/bin/sh
# Build the Debian package: dist/echod_<version>_all.deb, checked by lintian.
#
# Usage: packaging/build-deb.sh [OUTPUT_DIR]      (default: dist/ at the top of the tree)
#
# The source tree is copied to a scratch directory with packaging/debian/ as its debian/, so
# the work tree stays clean. Missing build dependencies are installed with apt-get (root).
# Environment: LINTIAN=0 skips lintian (it adds about 20 s).
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/dist}
build_deps="build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-argcomplete python3-setuptools lintian"

fail() {
	echo "build-deb: $*" >&2
	exit 1
}

# The version comes from the package itself; the Debian changelog must agree with it.
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/echod/__init__.py")
[ -n "$version" ] || fail "no __version__ in echod/__init__.py"
changelog_version=$(dpkg-parsechangelog -l "$top/packaging/debian/changelog" -S Version)
[ "$changelog_version" = "$version" ] ||
	fail "packaging/debian/changelog is at $changelog_version but echod is $version: add an entry"
for generated in config/echod.yaml packaging/man/echod.yaml.5; do
	[ -f "$top/$generated" ] || fail "$generated is missing (it is generated from the settings table)"
done

missing=""
for pkg in $build_deps; do
	dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' ||
		missing="$missing $pkg"
done
if [ -n "$missing" ]; then
	echo "build-deb: installing build dependencies:$missing" >&2
	# shellcheck disable=SC2086 # one word per package
	install_missing() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends $missing >&2; }
	# A fresh machine may have no package lists yet.
	install_missing || { apt-get -o DPkg::Lock::Timeout=300 update >&2 && install_missing; }
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/echod-deb.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
src="$scratch/echod-$version"
mkdir "$src"
# What the package is built from: the tree without VCS data, caches and earlier builds.
tar -C "$top" -cf - \
	--exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
	--exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache \
	--exclude=.ruff_cache --exclude=./.venv --exclude=./packaging/debian . |
	tar -C "$src" -xf -
cp -a "$top/packaging/debian" "$src/debian"

# Debian's own Python and tools, never a virtualenv or pyenv shim earlier on PATH.
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$scratch/build.log" 2>&1 || {
	tail -n 60 "$scratch/build.log" >&2
	fail "dpkg-buildpackage failed"
}
deb="$scratch/echod_${version}_all.deb"
[ -f "$deb" ] || fail "dpkg-buildpackage made no $deb"

if [ "${LINTIAN:-1}" != 0 ]; then
	# Errors fail the build; warnings are shown for the record.
	PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error --tag-display-limit 0 "$scratch/echod_${version}_"*.changes >&2 ||
		fail "lintian reported errors"
fi

mkdir -p "$out"
cp "$deb" "$out/"
echo "$out/echod_${version}_all.deb"
