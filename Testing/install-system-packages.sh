#!/bin/sh
# System packages some tests need: Orthanc with its DICOMweb plugin (a real PACS for `covidct send`), DCMTK and
# dicom3tools (dciodvfy, the DICOM validator). `make test` runs this before pytest; CI runs it as root on a fresh
# clone. Idempotent: it installs only what is missing, and only as root with apt-get; elsewhere it says which tests
# will skip and changes nothing; an apt-get failure (no network) is said in one line and the tests skip.

PACKAGES="orthanc orthanc-dicomweb dcmtk dicom3tools"
missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-packages:$missing not installed (needs root and apt-get); the tests that need them will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# --no-install-recommends: Orthanc's recommended plugins are not wanted; the tests choose the plugins they load.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; }; then
    echo "install-system-packages: apt-get could not install$missing; the tests that need them will skip"
fi
