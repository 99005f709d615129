// How the page writes values: as the terminal's `ps` does, with times in the browser's own time zone.

export function duration(seconds) {
  if (seconds == null) return "-";
  seconds = Math.floor(seconds);
  const days = Math.floor(seconds / 86400);
  const hours = Math.floor((seconds % 86400) / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const secs = seconds % 60;
  if (days) return `${days}d ${hours}h`;
  if (hours) return `${hours}h ${minutes}m`;
  if (minutes) return `${minutes}m ${secs}s`;
  return `${secs}s`;
}

export function bytes(value) {
  if (value == null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i += 1;
  }
  return `${value.toFixed(i && value < 10 ? 1 : 0)} ${units[i]}`;
}

export function number(value, digits = 1) {
  return value == null ? "-" : value.toFixed(digits);
}

// An epoch in seconds, in the browser's zone: the time today, else date and time.
export function localTime(epoch) {
  if (!epoch) return "-";
  const when = new Date(epoch * 1000);
  const today = new Date().toDateString() === when.toDateString();
  return today ? when.toLocaleTimeString() : when.toLocaleString();
}

export function isoTime(epoch) {
  return epoch ? new Date(epoch * 1000).toISOString() : "";
}

// The STATUS column as `ps` writes it; the class carries the terminal dashboard's colour.
export function statusText(record) {
  if (record.status === "exited" && record.exit_code != null) return `exited (${record.exit_code})`;
  return record.status;
}

export function statusClass(status) {
  return `status-${(status || "unknown").replace(/[^a-z-]/g, "")}`;
}

export function healthClass(health) {
  return `health-${(health || "unknown").replace(/[^a-z-]/g, "")}`;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("aria-") || key === "role" || key === "for") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c != null));
  return node;
}
