#!/usr/bin/env bash
# Makes sure this machine can speak (espeak-ng) and convert audio to every container the tests
# and the demo corpus use, mp3 included (sox + its format handlers), installing with apt what is
# missing. It checks capabilities, not commands: sox is often installed without its mp3 handler.
set -euo pipefail

sox_writes_mp3() { sox -h 2>/dev/null | grep -i "audio file formats" | grep -qw mp3; }

missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v sox >/dev/null || missing+=(sox)
sox_writes_mp3 || missing+=(libsox-fmt-all)
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install_speech_tools.sh: installing ${missing[*]} (apt)"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
if ! sox_writes_mp3; then
    echo "install_speech_tools.sh: sox still lists no mp3 format after installing libsox-fmt-all;" \
         "install an mp3 handler for sox (Debian/Ubuntu: libsox-fmt-mp3)" >&2
    exit 1
fi
