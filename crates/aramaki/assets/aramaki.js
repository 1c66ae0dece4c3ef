// Aramaki's own script: behaviours that would otherwise be inline handlers,
// which the Content-Security-Policy forbids. Pages work without it.
document.addEventListener("htmx:afterRequest", function (event) {
  var form = event.detail.elt;
  if (event.detail.successful && form && form.matches && form.matches("form[data-reset-on-success]")) {
    form.reset();
  }
});
