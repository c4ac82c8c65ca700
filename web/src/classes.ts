/**
 * How every page names a dataset class: by its name, and where the name is a number other
 * than the class's index (an ImageFolder of folders "10" and "4": class 0 is "10"), by its
 * index too, so "class 10" is never read as the class at index 10, nor "class 4" on one
 * page as "class 4 (index 1)" on another. A name that is no number needs no index.
 */

function numberOtherThan(name: string, index: number | null): boolean {
  return /^\d+$/.test(name) && index !== null && index >= 0 && name !== String(index);
}

/** `10 (index 0)`, `4`, `cat`: after a word that says it is a class ("label", "predicted"). */
export function classLabel(name: string | null | undefined, index: number | null): string {
  const n = name ?? (index === null ? "–" : String(index));
  return numberOtherThan(n, index) ? `${n} (index ${index})` : n;
}

/** `class 10 (index 0)`, `class 4`, `class cat`: where the words say nothing else of it. */
export function classText(name: string | null | undefined, index: number | null): string {
  return `class ${classLabel(name, index)}`;
}

/** `class 10 (index 0)`, `class 4`, `cat`: in a caption beside a value and a `#id`, where a
 * bare number would read as a third number and a bare word reads well. */
export function classWord(name: string | null | undefined, index: number | null): string {
  const n = name ?? (index === null ? "–" : String(index));
  return /^\d+$/.test(n) ? classText(n, index) : n;
}

/** `class '4'`, `class '10' (index 0)`, `class 'cat'`: the class an output unit stands for,
 * its name quoted. */
export function outputClass(name: string, index: number): string {
  return numberOtherThan(name, index) ? `class '${name}' (index ${index})` : `class '${name}'`;
}

/** The style of a top-5 list whose names are `names`: its name column as wide as the
 * longest (`--pname`), so "10 (index 1)" is never cut to "10 (in…" (the CSS caps it). */
export function namesWidth(names: string[]): string {
  return `--pname: ${Math.max(0, ...names.map((n) => n.length))}ch`;
}
