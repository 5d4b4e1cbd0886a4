// Bastion console behaviour: copy buttons and charts. Loaded as a file (the CSP forbids inline scripts).
(function () {
  "use strict";

  function bindCopy(root) {
    root.querySelectorAll("[data-copy-target]").forEach(function (button) {
      if (button.dataset.bound) return;
      button.dataset.bound = "1";
      button.addEventListener("click", function () {
        var field = document.getElementById(button.dataset.copyTarget);
        if (!field) return;
        var done = function () {
          var status = document.getElementById(button.dataset.copyStatus || "");
          if (status) status.textContent = "Copied to the clipboard.";
        };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(field.value).then(done, function () { field.select(); });
        } else {
          field.select();
          document.execCommand("copy");
          done();
        }
      });
    });
  }

  var palette = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#dc2626", "#0891b2"];

  function drawCharts(root) {
    if (typeof Chart === "undefined") return;
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (canvas.dataset.drawn) return;
      canvas.dataset.drawn = "1";
      var spec = JSON.parse(canvas.dataset.chart);
      var datasets = spec.datasets.map(function (d, i) {
        return { label: d.label, data: d.data, backgroundColor: palette[i % palette.length],
                 borderColor: palette[i % palette.length], spanGaps: true };
      });
      new Chart(canvas, {
        type: spec.type,
        data: { labels: spec.labels, datasets: datasets },
        options: { animation: false, responsive: true, maintainAspectRatio: false,
                   plugins: { title: { display: true, text: spec.title } },
                   scales: spec.type === "bar" ? { x: { stacked: true }, y: { stacked: true, beginAtZero: true } }
                                               : { y: { min: 0, max: 1 } } }
      });
    });
  }

  function init(root) { bindCopy(root); drawCharts(root); }
  document.addEventListener("DOMContentLoaded", function () { init(document); });
  document.addEventListener("htmx:afterSwap", function (e) { init(e.target); });
})();
