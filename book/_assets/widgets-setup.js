// Loaded between require.js and the widget manager (embed-amd.js) on the pages that have stored
// widgets (myst-nb's nb_ipywidgets_js in _config.yml). Two adjustments for a site that works offline:
(function () {
  // 1. The widget manager loads its icon fonts from the folder of its AMD module, which requirejs
  //    places next to the page. Point that module path at the copies the site serves itself.
  var staticDir = document.currentScript.src.replace(/[^\/]*$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": staticDir + "vendor/widgets/fonts" } });

  // 2. ipywidgets typesets the math in widget labels with the MathJax 2 API (MathJax.Hub.Queue);
  //    the book loads MathJax 3, so translate those calls. MathJax is a deferred script: it has run
  //    by DOMContentLoaded, before the widget manager renders (on load).
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || !mj.version || mj.Hub) return;
    mj.Hub = {
      Queue: function () {
        var elements = [];
        for (var i = 0; i < arguments.length; i++) {
          var job = arguments[i];
          if (Array.isArray(job) && job[0] === "Typeset" && job[2]) elements.push(job[2]);
        }
        if (!elements.length || !mj.typesetPromise) return;
        var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
        return ready.then(function () { return mj.typesetPromise(elements); });
      },
    };
  });
})();
