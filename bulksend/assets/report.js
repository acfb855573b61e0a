/* bulksend's HTML report: draws the page's charts (the JSON in #bulksend-data, made by
   bulksend/html.py chart_specs) with uPlot. Zoom: drag across a chart, double click to
   reset; the time charts zoom and hover together. Values under the cursor show in each
   chart's legend; clicking a legend entry hides or shows its line. */
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("bulksend-data").textContent);
  const bucket = data.width; // seconds per chart point
  const charts = {}; // id -> uPlot instance (the tests and the console use it)
  window.bulksendCharts = charts;

  const formats = [0, 1, 2, 3].map(
    (d) => new Intl.NumberFormat("en-US", { maximumFractionDigits: d }),
  );
  function num(v) {
    if (v == null) return "–";
    const a = Math.abs(v);
    return formats[a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3].format(v);
  }
  function ms(v) {
    if (v == null) return "–";
    return v >= 1000 ? num(v / 1000) + " s" : num(v) + " ms";
  }
  function percent(v) {
    return v == null ? "–" : num(v) + " %";
  }
  function formatter(unit) {
    return unit === "ms" ? ms : unit === "%" ? percent : num;
  }
  function clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toISOString().slice(11, 19);
  }
  function duration(s) {
    if (s < 60) return num(s) + " s";
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = Math.round(s % 60);
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? h + ":" : "") + mm + ":" + String(sec).padStart(2, "0");
  }

  // Log-axis ticks people read at a glance: 1-2-5 per decade, thinner over wide ranges.
  function logSplits(u, axisIdx, min, max) {
    const decades = Math.log10(max / min);
    const steps = decades > 5 ? [1] : decades > 2.5 ? [1, 3] : [1, 2, 5];
    const out = [];
    for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) {
      for (const m of steps) {
        const v = +(m * Math.pow(10, e)).toPrecision(6);
        if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) out.push(v);
      }
    }
    return out;
  }
  function all(u, splits) {
    return splits;
  }
  // Time ticks at round durations (seconds, minutes, hours), not at 1-2-5 seconds.
  const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
    10800, 21600, 43200, 86400];

  function fromZero(u, min, max) {
    return [0, max != null && max > 0 ? max * 1.05 : 1];
  }

  // Shade the buckets the run only partly covered (its first and last), under the lines.
  function partialShading(spec) {
    return {
      hooks: {
        drawClear: [
          (u) => {
            const ctx = u.ctx;
            const { left, top, width, height } = u.bbox;
            const ratio = window.devicePixelRatio || 1;
            ctx.save();
            ctx.beginPath();
            ctx.rect(left, top, width, height);
            ctx.clip();
            for (const [i] of spec.partial) {
              const x0 = Math.max(left, u.valToPos(spec.x[i] - bucket / 2, "x", true));
              const x1 = Math.min(left + width, u.valToPos(spec.x[i] + bucket / 2, "x", true));
              if (x1 <= x0) continue;
              ctx.fillStyle = "rgba(120,120,120,0.14)";
              ctx.fillRect(x0, top, x1 - x0, height);
              ctx.font = 11 * ratio + "px system-ui, sans-serif";
              if (ctx.measureText("partial").width + 8 * ratio > x1 - x0) continue;
              ctx.fillStyle = "#666";
              ctx.fillText("partial", x0 + 4 * ratio, top + 13 * ratio);
            }
            ctx.restore();
          },
        ],
      },
    };
  }

  let syncing = false;
  const timeCharts = [];
  function zoomTogether(u, key) {
    if (key !== "x" || syncing) return;
    syncing = true;
    for (const other of timeCharts) {
      if (other !== u) other.setScale("x", { min: u.scales.x.min, max: u.scales.x.max });
    }
    syncing = false;
  }

  function options(spec, el) {
    const time = spec.kind === "time";
    const covered = new Map(spec.partial.map(([i, c]) => [i, c]));
    const xSeries = time
      ? {
          label: "time",
          value: (u, v, si, idx) => {
            if (v == null || idx == null) return "–";
            const start = v - bucket / 2;
            let text = "+" + duration(start) + " (" + clock(data.t0 + start) + " UTC)";
            if (covered.has(idx)) {
              text += ", partial: " + num(covered.get(idx)) + " of " + bucket + " s, rates scaled to it";
            }
            return text;
          },
        }
      : {
          label: "latency",
          value: (u, v, si, idx) =>
            v == null || idx == null ? "–" : ms(v) + " to " + ms(spec.x[idx + 1] ?? v),
        };
    const series = [xSeries];
    const scales = { x: time ? { time: false } : { time: false, distr: 3, log: 10 } };
    scales.y = spec.log ? { distr: 3, log: 10 } : { range: fromZero };
    let leftUnit = null;
    let pct = false;
    for (const s of spec.series) {
      const scale = s.scale || "y";
      if (scale === "pct") pct = true;
      else leftUnit = leftUnit || s.unit;
      series.push({
        label: s.label,
        stroke: s.color,
        width: 1.5,
        dash: s.dash ? [6, 4] : undefined,
        fill: s.fill ? s.color + "44" : undefined,
        scale: scale,
        spanGaps: false,
        value: (u, v) => formatter(s.unit)(v),
        paths: time ? undefined : uPlot.paths.stepped({ align: 1 }),
        points: time ? undefined : { show: false },
      });
    }
    const yFormat = formatter(leftUnit);
    const axes = [
      time
        ? {
            label: "time since " + clock(data.t0) + " UTC",
            incrs: TIME_INCRS,
            values: (u, splits) => splits.map(duration),
          }
        : { label: "latency", splits: logSplits, filter: all, values: (u, splits) => splits.map(ms) },
      {
        label: leftUnit || "",
        size: 72,
        splits: spec.log ? logSplits : undefined,
        // uPlot labels only the powers of ten of a log axis: ours label every split.
        filter: spec.log ? all : undefined,
        values: (u, splits) => splits.map(yFormat),
      },
    ];
    if (pct) {
      scales.pct = { range: fromZero };
      axes.push({
        scale: "pct",
        side: 1,
        size: 64,
        grid: { show: false },
        values: (u, splits) => splits.map(percent),
      });
    }
    return {
      width: el.clientWidth,
      height: spec.height || 260,
      series: series,
      scales: scales,
      axes: axes,
      cursor: time
        ? { sync: { key: "bulksend-time", setSeries: false }, drag: { x: true, y: false } }
        : { drag: { x: true, y: false } },
      // Time charts without a right axis keep its room, so that all their x axes line up.
      padding: [null, time && !pct ? 64 : null, null, null],
      hooks: time ? { setScale: [zoomTogether] } : {},
      plugins: time && spec.partial.length ? [partialShading(spec)] : [],
    };
  }

  for (const spec of data.charts) {
    const el = document.querySelector('.plot[data-chart="' + spec.id + '"]');
    if (spec.empty) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = spec.empty;
      el.appendChild(p);
      continue;
    }
    const u = new uPlot(options(spec, el), [spec.x, ...spec.series.map((s) => s.values)], el);
    charts[spec.id] = u;
    if (spec.kind === "time") timeCharts.push(u);
  }

  let pending = null;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(() => {
      for (const spec of data.charts) {
        const u = charts[spec.id];
        if (u) u.setSize({ width: u.root.parentNode.clientWidth, height: spec.height || 260 });
      }
    }, 100);
  });
})();
