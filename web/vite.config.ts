import { defineConfig } from "vite";

// Relative asset URLs (base './') so the static export works from any folder; the build
// lands inside the Python package, which ships it (no Node needed by users).
export default defineConfig({
  base: "./",
  build: {
    outDir: "../src/lurker/server/static",
    emptyOutDir: true,
    target: "es2022",
    chunkSizeWarningLimit: 400,
  },
  worker: { format: "es" },
  server: { proxy: { "/api": "http://127.0.0.1:8000" } },
});
