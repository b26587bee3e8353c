/* The Jupyter widgets manager (ipywidgets 8) typesets widget labels through MathJax 2's API,
 * MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]). The book serves MathJax 3, which has no
 * Hub: without this bridge every widget with a description throws a TypeError in the console.
 * MathJax (a deferred script) has replaced its configuration object by the time the document
 * is parsed, so the bridge is installed on DOMContentLoaded, before the widgets render (load). */
document.addEventListener("DOMContentLoaded", function () {
  var mj = window.MathJax;
  if (!mj || mj.Hub || !mj.version || String(mj.version).charAt(0) !== "3") return;
  mj.Hub = {
    Queue: function () {
      for (var i = 0; i < arguments.length; i++) {
        var job = arguments[i];
        if (!Array.isArray(job) || job[0] !== "Typeset") continue;
        var element = job[2];
        mj.startup.promise
          .then(function () { return mj.typesetPromise(element ? [element] : undefined); })
          .catch(function (err) { console.warn("MathJax could not typeset a widget label", err); });
      }
    }
  };
});
