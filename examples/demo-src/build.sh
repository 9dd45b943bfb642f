#!/bin/sh
# Builds the demo "application": a text file assembled from the sources.
set -e
mkdir -p dist
{
  echo "app: $(cat src/name.txt)"
  echo "lines of source: $(cat src/*.txt | wc -l)"
  cat src/greeting.txt
} > dist/app.txt
echo "built dist/app.txt"
