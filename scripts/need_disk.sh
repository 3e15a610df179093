#!/usr/bin/env bash
# need_disk.sh GIB WHAT: warn on stderr, before pip fails half-way, when the current folder's disk has
# less than GIB GiB free for WHAT (a CI machine can be short of disk; a full one fails tests at random).
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${free_kb:-0}" -lt $(($1 * 1024 * 1024)) ]; then
    echo "warning: only $((free_kb / 1024)) MiB free on $(df -P . | awk 'NR==2 {print $6}'); $2 needs about $1 GiB" >&2
fi
