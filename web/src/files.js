// Input files (dropped or chosen → the request's `files`, as base64) and
// output files (listed; images shown inline). Output files are fetched with
// the token and shown from blob: URLs, so no token ever goes in a URL.
import { request } from "./api.js";

const IMAGE_TYPES = new Set(["image/png", "image/jpeg", "image/svg+xml", "image/gif", "image/webp"]);
const INLINE_MAX = 16 * 1024 * 1024; // bytes: bigger images are listed, not shown

export class InputFiles {
  constructor(list, onChange) {
    this.list = list;
    this.files = new Map(); // path → File
    this.onChange = onChange;
  }

  add(fileList) {
    for (const file of fileList) this.files.set(file.webkitRelativePath || file.name, file);
    this.render();
  }

  clear() {
    this.files.clear();
    this.render();
  }

  render() {
    this.list.replaceChildren(...[...this.files].map(([path, file]) => {
      const item = document.createElement("li");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove ${path}`);
      remove.addEventListener("click", () => { this.files.delete(path); this.render(); });
      item.append(`${path} (${formatBytes(file.size)}) `, remove);
      return item;
    }));
    this.onChange?.();
  }

  async payload() {
    const out = [];
    for (const [path, file] of this.files) out.push({ path, content_b64: toBase64(await file.arrayBuffer()) });
    return out;
  }
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

export function formatBytes(n) {
  if (n == null) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

const objectUrls = [];

export function releaseFiles() {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
}

async function blobUrl(url) {
  const blob = await (await request(url)).blob();
  const href = URL.createObjectURL(blob);
  objectUrls.push(href);
  return href;
}

/** Lists a run's output files: a download button each, and images under the list. */
export function renderOutputFiles(list, files, onError) {
  releaseFiles();
  list.replaceChildren(...files.map((file) => {
    const item = document.createElement("li");
    const download = document.createElement("button");
    download.type = "button";
    download.className = "link";
    download.textContent = file.path;
    download.setAttribute("aria-label", `Download ${file.path}`);
    download.addEventListener("click", async () => {
      try {
        const anchor = document.createElement("a");
        anchor.href = await blobUrl(file.url);
        anchor.download = file.path.split("/").pop();
        anchor.click();
      } catch (error) { onError(error); }
    });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = ` ${formatBytes(file.size)} · ${file.media_type}`;
    item.append(download, meta);
    if (IMAGE_TYPES.has(file.media_type) && file.size <= INLINE_MAX) {
      const figure = document.createElement("figure");
      const image = document.createElement("img");
      image.alt = `${file.path}, written by the run`;
      image.dataset.path = file.path;
      figure.append(image);
      item.append(figure);
      blobUrl(file.url).then((href) => { image.src = href; }, onError);
    }
    return item;
  }));
}
