#!/usr/bin/env bash
# Download the browser assets the site serves itself (MathJax, require.js, the widget manager)
# from the npm registry and copy them into book/_assets/vendor.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=book/_assets/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15 >/dev/null)
for f in "$tmp"/*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
mj="$tmp/mathjax-3.2.2/package/es5"
rm -rf "$dest/mathjax" && mkdir -p "$dest/mathjax/output/chtml/fonts" "$dest/mathjax/input"
cp "$mj/tex-chtml.js" "$dest/mathjax/"
cp -r "$mj/output/chtml/fonts/woff-v2" "$dest/mathjax/output/chtml/fonts/"
cp -r "$mj/input/tex" "$mj"/input/tex*.js "$dest/mathjax/input/"
cp -r "$mj/a11y" "$mj/ui" "$dest/mathjax/"
cp "$tmp/mathjax-3.2.2/package/LICENSE" "$dest/mathjax/LICENSE"
mkdir -p "$dest/widgets"
cp "$tmp/requirejs-2.3.8/package/require.js" "$dest/widgets/"
cp "$tmp/jupyter-widgets-html-manager-1.0.15/package/dist/embed-amd.js" "$dest/widgets/"
# Its icon fonts (Font Awesome, SIL OFL 1.1); book/_assets/widgets-setup.js points the manager at them.
rm -rf "$dest/widgets/fonts" && mkdir -p "$dest/widgets/fonts"
cp "$tmp/jupyter-widgets-html-manager-1.0.15/package/dist/"*.{woff2,woff,ttf} "$dest/widgets/fonts/"
# The widget CSS bundled in embed-amd.js mentions a Google Fonts stylesheet (`@import url(...)`, commented
# out upstream). Remove every such import so that no version of the file can make the site load fonts
# from another host; tests/test_site.py checks that none is left.
sed -E -i "s#@import url\\([^)]*fonts\\.googleapis\\.com[^)]*\\);?##g" "$dest/widgets/embed-amd.js"
echo "vendored assets refreshed in $dest"
