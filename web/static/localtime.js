// Times are sent in UTC; show each <time datetime="..."> in the browser's own time zone.
(() => {
  "use strict";
  document.querySelectorAll("time[datetime]").forEach((el) => {
    const when = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(when.getTime())) return;
    el.title = el.textContent;
    el.textContent = when.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  });
})();
